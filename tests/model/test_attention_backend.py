"""The attention kernel the model picks (model/attention.py): never torch's silent fallback to
the math backend on CUDA, the KV heads repeated where the fp32 kernel needs it, in the order
grouped-query attention pairs them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from stem_megatron.model import attention


def test_cuda_backends_exclude_math_where_a_fused_kernel_fits() -> None:
    assert attention.backends_for("cuda", torch.float32, 64) == (
        [SDPBackend.EFFICIENT_ATTENTION],
        True,
    )
    backends, repeat = attention.backends_for("cuda", torch.bfloat16, 128)
    assert backends[0] == SDPBackend.FLASH_ATTENTION and SDPBackend.MATH not in backends
    assert not repeat
    assert attention.backends_for("cpu", torch.float32, 64) == (None, False)


def test_head_dims_no_fused_kernel_takes_run_math_and_say_so() -> None:
    assert not attention.math_attention(128)
    assert attention.math_attention(12) and attention.math_attention(264)
    with pytest.warns(UserWarning, match="math backend \\(head dim 12"):
        assert attention.backends_for("cuda", torch.bfloat16, 12) == ([SDPBackend.MATH], False)


def _qkv(device: str, dtype: torch.dtype, heads: int = 8, kv_heads: int = 2):
    gen = torch.Generator(device).manual_seed(0)
    return [
        torch.randn(2, n, 32, 16, generator=gen, device=device).to(dtype)
        for n in (heads, kv_heads, kv_heads)
    ]


def test_repeated_kv_heads_pair_as_grouped_query_attention(monkeypatch) -> None:
    """The repeat the fp32 CUDA path makes, run on the CPU: the same output as torch's own
    grouped-query attention (query head i reads KV head i // (heads / kv heads))."""
    q, k, v = _qkv("cpu", torch.float32)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    monkeypatch.setattr(attention, "backends_for", lambda *_: ([SDPBackend.MATH], True))
    torch.testing.assert_close(attention.causal_attention(q, k, v), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_runs_a_fused_kernel(dtype: torch.dtype) -> None:
    """On CUDA the chosen fused kernel takes grouped-query attention in fp32 and bf16 (with
    math excluded, torch raises instead of falling back) and agrees with the math backend."""
    q, k, v = _qkv("cuda", dtype)
    got = attention.causal_attention(q, k, v)
    want = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
