"""Make megatron-core run on CPU/gloo, applied only when CUDA is absent.

megatron-core hard-codes a few CUDA calls: `torch.cuda.current_device()` as an allocation
device (p2p communication, some TP mappings), `torch.zeros(..., device="cuda")` in the pipeline
schedules, `torch.cuda.synchronize()`, and autocast decorators bound to the CUDA device (so a
CPU bf16 autocast reaches the backward of its linear layers with mixed dtypes). Each patch
below maps one of these to its CPU equivalent inside the megatron modules only; nothing global
in torch changes. The list of patched call sites was read off one version of megatron-core, so
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
)
# autograd Functions whose forward/backward carry CUDA-only custom_fwd/custom_bwd decorators.
_AUTOCAST_FUNCTIONS = (
    "LinearWithGradAccumulationAndAsyncCommunication",
    "LinearWithFrozenWeight",
)


class _CpuCuda:
    """Stands in for `torch.cuda` inside megatron modules on a machine without CUDA."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args, **_kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


def _cpu_device(kwargs: dict) -> dict:
    device = kwargs.get("device")
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        kwargs["device"] = "cpu"
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


_applied = False


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def apply() -> bool:
    """Patch megatron-core for CPU if CUDA is absent. Returns True when patches are active."""
    global _applied
    if torch.cuda.is_available():
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
            torch.amp.custom_fwd(fn_class.forward.__wrapped__, device_type="cpu"))
        fn_class.backward = staticmethod(
            torch.amp.custom_bwd(fn_class.backward.__wrapped__, device_type="cpu"))
    _applied = True
    return True
