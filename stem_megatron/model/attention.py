"""Which of torch's attention kernels (SDPA backends) the model's attention runs, chosen
explicitly rather than left to torch's fallback.

Where no fused kernel takes its inputs, `F.scaled_dot_product_attention` falls back to the math
backend, which keeps the s x s attention probabilities of every head for the backward (in fp32:
it upcasts half types). On CUDA, flash attention takes bf16/fp16 only (grouped KV heads
natively) and the memory-efficient kernel takes fp32 too but grouped KV heads only in recent
torch releases, so an fp32 model with grouped-query attention (train.bf16 false) would silently
run the math backend. Hence, on CUDA:
- fp32: the memory-efficient kernel, the KV heads repeated to the query heads first (as the
  math backend would do too);
- bf16/fp16: flash, or the memory-efficient kernel;
- a head dim no fused kernel takes (`math_attention`): the math backend, said once, and counted
  by the dry run (planning/activation_memory.py).
torch's CPU kernel takes every dtype, grouped heads and head dim: there torch chooses.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

FUSED_MAX_HEAD_DIM = 256  # flash attention's limit


def math_attention(head_dim: int) -> bool:
    """Whether attention runs the math backend on CUDA: the fused kernels need a head dim that
    is a multiple of 8 (their 16-byte alignment in half types) and at most 256."""
    return head_dim % 8 != 0 or head_dim > FUSED_MAX_HEAD_DIM


@functools.cache
def _warn_math(head_dim: int) -> None:
    warnings.warn(
        f"attention runs torch's math backend (head dim {head_dim}: the fused kernels take "
        f"multiples of 8 up to {FUSED_MAX_HEAD_DIM}); it stores s x s scores per head, which "
        f"the dry run counts",
        stacklevel=3,
    )


def backends_for(
    device_type: str, dtype: torch.dtype, head_dim: int
) -> tuple[list[SDPBackend] | None, bool]:
    """(the backends allowed, or None for torch's choice; whether to repeat the KV heads)."""
    if device_type != "cuda":
        return None, False
    if math_attention(head_dim):
        _warn_math(head_dim)
        return [SDPBackend.MATH], False
    if dtype == torch.float32:
        return [SDPBackend.EFFICIENT_ATTENTION], True
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], False


def cuda_plan(bf16: bool, head_dim: int) -> tuple[bool, bool]:
    """(math backend, KV heads repeated): what attention runs on CUDA, for the dry run."""
    backends, repeat = backends_for("cuda", torch.bfloat16 if bf16 else torch.float32, head_dim)
    return backends == [SDPBackend.MATH], repeat


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [b, heads, s, d], k and v [b, kv heads, s, d] -> [b, heads, s, d]."""
    backends, repeat_kv = backends_for(q.device.type, q.dtype, q.shape[-1])
    if repeat_kv and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
