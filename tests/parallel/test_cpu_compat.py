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
    with pytest.raises(RuntimeError, match=r"written for megatron-core 0\.16\.1, but 0\.17\.0 is "
                                           r"installed.*pip install megatron-core==0\.16\.1"):
        cpu_compat.apply()


def test_patches_cover_megatron_modules_and_nothing_else():
    assert cpu_compat.apply() is True
    for name in ("megatron.core.pipeline_parallel.schedules",
                 "megatron.core.pipeline_parallel.p2p_communication",
                 "megatron.core.tensor_parallel.mappings"):
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

    from stem_megatron.model.transformer import ModelSpec, megatron_config
    from stem_megatron.config import ModelConfig
    from stem_megatron.parallel.state import ParallelState

    parallel = ParallelState.initialize()
    try:
        config = megatron_config(ModelSpec(model=ModelConfig(), vocab_size=256, stem_layers=()))
        layer = ColumnParallelLinear(16, 32, config=config, init_method=lambda w: None,
                                     bias=False, gather_output=False,
                                     tp_group=parallel_state.get_tensor_model_parallel_group())
        torch.nn.init.normal_(layer.weight)
        x = torch.randn(4, 2, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)[0]
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert x.grad.shape == x.shape and layer.weight.grad.dtype == torch.float32
    finally:
        parallel.destroy()
