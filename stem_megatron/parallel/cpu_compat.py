"""Make megatron-core run on CPU/gloo, applied when a process runs on the CPU (CUDA absent, or
STEM_DEVICE=cpu: parallel/state.py).

megatron-core hard-codes a few CUDA calls: `torch.cuda.current_device()` as an allocation
device (p2p communication, some TP mappings, DDP's grad buffers, the distributed optimizer),
`torch.zeros(..., device="cuda")` in the pipeline schedules and the optimizers,
`torch.cuda.synchronize()`, autocast decorators bound to the CUDA device (so a CPU bf16
autocast reaches the backward of its linear layers with mixed dtypes), and dtype checks
against the strings `param.type()` returns for CUDA tensors ('torch.cuda.FloatTensor') in the
optimizers' constructors. Each patch below maps one of these to its CPU equivalent inside the
megatron modules only; nothing global in torch changes outside those constructors' calls.
The list of patched call sites was read off one version of megatron-core, so
`apply()` refuses any other version instead of silently running half-patched.
"""

from __future__ import annotations

import functools
import importlib
import types

import torch

SUPPORTED_MEGATRON_CORE = "0.16.1"

# Modules that call torch.cuda.* or allocate on "cuda" on the code paths we use.
_PATCHED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.rerun_state_machine",  # DDP's check_for_nan_in_grad reports through it
    # sequence parallelism: the all-gather buffer and the linears' reduce-scatter outputs
    "megatron.core.utils",
    "megatron.core.tensor_parallel.layers",
    # optimizer offload: CUDA streams and pinned host buffers
    "megatron.core.optimizer.cpu_offloading.hybrid_optimizer",
)
# Callables that compare `tensor.type()` with CUDA type names: (module, attribute path).
_CUDA_TYPE_CHECKS = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
)
# autograd Functions whose forward/backward carry CUDA-only custom_fwd/custom_bwd decorators.
_AUTOCAST_FUNCTIONS = (
    "LinearWithGradAccumulationAndAsyncCommunication",
    "LinearWithFrozenWeight",
)


class _CpuStream(torch.cpu.Stream):
    """torch's CPU stream stand-in, whose `record_event` returns an event to wait on."""

    def record_event(self, event: torch.cpu.Event | None = None) -> torch.cpu.Event:
        return event if event is not None else torch.cpu.Event()


class _CpuCuda:
    """Stands in for `torch.cuda` inside megatron modules on a machine without CUDA."""

    Stream = _CpuStream
    stream = staticmethod(torch.cpu.stream)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def current_stream(*_args, **_kwargs) -> _CpuStream:
        return _CpuStream()

    @staticmethod
    def synchronize(*_args, **_kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


def _cpu_device(kwargs: dict) -> dict:
    device = kwargs.get("device")
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        kwargs["device"] = "cpu"
    kwargs.pop("pin_memory", None)  # pinning needs an accelerator; without one it raises
    return kwargs


class _CpuTorch(types.ModuleType):
    """A view of the torch module whose CUDA allocations land on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for factory in ("zeros", "empty", "ones", "tensor", "full"):
            setattr(self, factory, self._on_cpu(getattr(torch, factory)))

    @staticmethod
    def _on_cpu(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **_cpu_device(kwargs))

        return wrapper

    def __getattr__(self, name: str):
        return getattr(torch, name)


_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(tensor: torch.Tensor, *args, **kwargs):
    """`Tensor.type()` as a CUDA tensor of the same dtype answers it ('torch.cuda.FloatTensor')."""
    name = _TENSOR_TYPE(tensor, *args, **kwargs)
    if args or kwargs or tensor.device.type != "cpu":
        return name
    return name.replace("torch.", "torch.cuda.", 1)


def _with_cuda_type_names(fn):
    """`fn` with CPU tensors reporting CUDA type names while it runs (megatron's dtype
    checks accept only those). Single-threaded constructors and a clip: nothing else runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch.Tensor.type = _cuda_type_name
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = _TENSOR_TYPE

    return wrapper


_applied = False


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def apply(on_cpu: bool | None = None) -> bool:
    """Patch megatron-core for CPU when this process runs on it (`on_cpu`; None: when CUDA is
    absent). Returns True when patches are active."""
    global _applied
    if on_cpu is None:
        on_cpu = not torch.cuda.is_available()
    if not on_cpu:
        return False
    if _applied:
        return True
    version = megatron_core_version()
    if version != SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"stem_megatron's CPU compatibility layer for megatron-core was written for "
            f"megatron-core {SUPPORTED_MEGATRON_CORE}, but {version} is installed. On a machine "
            f"without CUDA install the supported version: "
            f"pip install megatron-core=={SUPPORTED_MEGATRON_CORE}"
        )
    cpu_torch = _CpuTorch()
    for name in _PATCHED_MODULES:
        importlib.import_module(name).torch = cpu_torch
    layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    for name in _AUTOCAST_FUNCTIONS:
        fn_class = getattr(layers, name)
        # custom_fwd/custom_bwd keep the undecorated function in __wrapped__.
        fn_class.forward = staticmethod(
            torch.amp.custom_fwd(fn_class.forward.__wrapped__, device_type="cpu")
        )
        fn_class.backward = staticmethod(
            torch.amp.custom_bwd(fn_class.backward.__wrapped__, device_type="cpu")
        )
    for module_name, path in _CUDA_TYPE_CHECKS:
        owner = importlib.import_module(module_name)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        setattr(owner, name, _with_cuda_type_names(getattr(owner, name)))
    _cpu_rng_states(importlib.import_module("megatron.core.tensor_parallel.random"))
    hybrid = importlib.import_module("megatron.core.optimizer.cpu_offloading.hybrid_optimizer")
    split = hybrid.HybridDeviceOptimizer._get_sub_optimizer_param_groups
    hybrid.HybridDeviceOptimizer._get_sub_optimizer_param_groups = _host_copies(split)
    _applied = True
    return True


def _cpu_rng_states(random) -> None:
    """Recomputation (megatron's CheckpointFunction) saves and restores the CPU generator and
    the CUDA one; without CUDA the CPU generator is the only one, so the CUDA half is empty."""
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    random._set_cuda_rng_state = lambda *args, **kwargs: None


def _host_copies(split):
    """Optimizer offload (HybridDeviceOptimizer) offloads the CUDA parameters only, so without
    CUDA it offloads none and then finds no device parameter for its host ones. Give each
    parameter the host copy an offloaded CUDA parameter gets (its fp32 copy when it has one):
    the same gradient copy-in, host step and copy-back then run, between two host tensors."""

    @functools.wraps(split)
    def wrapper(self, offload_fraction):
        host_groups, device_groups, to_host, to_device, to_fp32 = split(self, offload_fraction)
        of_fp32 = {id(copy): param for param, copy in to_fp32.items()}
        for group in host_groups:
            for i, inner in enumerate(group["params"]):
                param = of_fp32.get(id(inner), inner)
                if inner is param:
                    inner = group["params"][i] = param.detach().clone()
                to_host[param], to_device[inner] = inner, param
        return host_groups, device_groups, to_host, to_device, to_fp32

    return wrapper
