"""RoPE inverse frequencies, plain or with Llama 3's frequency scaling.

Llama 3.1+ (`rope_type: llama3`) stretches the slow rotations so a model trained on
`original_max_position_embeddings` tokens sees longer contexts at familiar angles, and leaves
the fast ones (which already cycle many times within that context) alone. Measured by
r = original_max_position_embeddings / wavelength, the number of turns a frequency makes in
the original context:

    r <= low_freq_factor    inv_freq / factor
    r >= high_freq_factor   inv_freq
    in between              a linear blend in r of the two

Both our model (transformer.py) and the plain reference (reference.py) take their
frequencies from here; tests/hf checks them against transformers' own llama3 RoPE.
"""

from __future__ import annotations

import math

import torch

from stem_megatron.config import RopeScalingConfig
from stem_megatron.modes import RopeScalingType


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig) -> torch.Tensor:
    """[head_dim / 2] float64 rotation speeds (radians per position) of the rotate-half pairs."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling.type == RopeScalingType.NONE:
        return inv_freq
    if scaling.type != RopeScalingType.LLAMA3:  # config validation refuses other types first
        raise ValueError(f"unsupported RoPE scaling type '{scaling.type}'")
    turns = scaling.original_max_position_embeddings * inv_freq / (2 * math.pi)
    kept = (
        (turns - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    ).clamp(0.0, 1.0)
    return inv_freq * (kept + (1.0 - kept) / scaling.factor)


def rotary_cos_sin(
    seq_length: int, head_dim: int, theta: float, scaling: RopeScalingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(seq_length, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, d]; rotate-half convention (as Llama and megatron's non-interleaved)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).to(x.dtype)
