"""The megatron-core CPU compatibility layer: refuses versions it was not written for, and
makes megatron's CUDA-only calls land on the CPU inside megatron's modules only."""

from __future__ import annotations

import importlib

import pytest
import torch

from stem_megatron.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="applies only without CUDA")


def test_installed_version_is_the_supported_one():
    assert cpu_compat.megatron_core_version() == cpu_compat.SUPPORTED_MEGATRON_CORE


def test_other_versions_are_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_applied", False)
    monkeypatch.setattr(cpu_compat, "megatron_core_version", lambda: "0.17.0")
    with pytest.raises(
        RuntimeError,
        match=r"written for megatron-core 0\.16\.1, but 0\.17\.0 is "
        r"installed.*pip install megatron-core==0\.16\.1",
    ):
        cpu_compat.apply()


def test_patches_cover_megatron_modules_and_nothing_else():
    assert cpu_compat.apply() is True
    for name in (
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.pipeline_parallel.p2p_communication",
        "megatron.core.tensor_parallel.mappings",
    ):
        module_torch = importlib.import_module(name).torch
        assert module_torch.cuda.current_device() == torch.device("cpu")
        assert module_torch.zeros(2, device="cuda").device.type == "cpu"
        module_torch.cuda.synchronize()  # a no-op instead of a CUDA error
    assert torch.cuda.current_device is not None and not torch.cuda.is_available()
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # torch itself is untouched


def test_megatron_linear_backward_under_cpu_bf16_autocast():
    """megatron's linears carry CUDA autocast decorators; on CPU their backward would meet
    bf16 gradients and fp32 weights without the patch."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from stem_megatron.config import ModelConfig
    from stem_megatron.model.transformer import ModelSpec, megatron_config
    from stem_megatron.parallel.state import ParallelState

    parallel = ParallelState.initialize()
    try:
        config = megatron_config(ModelSpec(model=ModelConfig(), vocab_size=256, stem_layers=()))
        layer = ColumnParallelLinear(
            16,
            32,
            config=config,
            init_method=lambda w: None,
            bias=False,
            gather_output=False,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )
        torch.nn.init.normal_(layer.weight)
        x = torch.randn(4, 2, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)[0]
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert x.grad.shape == x.shape and layer.weight.grad.dtype == torch.float32
    finally:
        parallel.destroy()


def _bf16_distributed_optimizer_steps(offload: bool, steps: int = 3):
    """A bf16 two-layer MLP in megatron-core's DDP, stepped by its distributed optimizer with
    or without optimizer offload: the parameters after `steps` steps, and the optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=1,
        bf16=True,
        params_dtype=torch.bfloat16,
        use_cpu_initialization=True,
    )
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
    ).to(torch.bfloat16)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            bf16=True,
            params_dtype=torch.bfloat16,
            clip_grad=0.0,
            use_distributed_optimizer=True,
            optimizer_cpu_offload=offload,
            optimizer_offload_fraction=1.0,
        ),
        [ddp],
    )
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(x).float().pow(2).mean().backward()
        ddp.finish_grad_sync()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], optimizer


def test_optimizer_offload_steps_host_copies_as_on_cuda():
    """megatron-core's HybridDeviceOptimizer (optim.optimizer_cpu_offload) hard-codes CUDA
    streams and offloads only CUDA tensors. Patched, it steps a separate host copy of every
    main parameter, copying gradients in and values back, and matches no offload bitwise."""
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    from stem_megatron.parallel.state import ParallelState

    parallel = ParallelState.initialize()
    try:
        initial = [p.detach().clone() for p in _bf16_distributed_optimizer_steps(False, 0)[0]]
        plain, _ = _bf16_distributed_optimizer_steps(False)
        offloaded, optimizer = _bf16_distributed_optimizer_steps(True)
    finally:
        parallel.destroy()
    hybrid = getattr(optimizer, "chained_optimizers", [optimizer])[0].optimizer
    assert isinstance(hybrid, HybridDeviceOptimizer) and hybrid.gpu_optimizer is None
    copies = hybrid.cpu_copys_map_gpu_param  # host copy -> the fp32 main parameter it steps
    assert len(copies) == 4  # two weights, two biases
    for host, main in copies.items():
        assert host is not main and host.dtype == main.dtype == torch.float32
        assert torch.equal(host, main)  # copied back after the step
    assert not any(torch.equal(a, b) for a, b in zip(plain, initial))
    assert all(torch.equal(a, b) for a, b in zip(plain, offloaded))
