"""A STEM table: the per-layer [vocab, d_ff] matrix that replaces the FFN up-projection.

Under tensor parallelism a rank holds the columns of its slice of the gate projection
([vocab, d_ff / TP]), so the lookup is local and STEM adds no communication. The table is a
Parameter (it counts, it is saved) but never has a dense `.grad`: its gradient is the
row-sparse one collected by `RowGradAccumulator` and applied by the sparse optimizer.
"""

from __future__ import annotations

import math

import torch

from stem_megatron.model.sharding import TPShard, set_tp_shard
from stem_megatron.stem.lookup import RowGradAccumulator, stem_lookup


def xavier_normal_std(vocab_size: int, ffn_hidden_size: int) -> float:
    """The paper's init: xavier-normal over the full [V, d_ff] table."""
    return math.sqrt(2.0 / (vocab_size + ffn_hidden_size))


class StemTable(torch.nn.Module):
    def __init__(self, vocab_size: int, ffn_hidden_size: int, tp_size: int = 1,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if ffn_hidden_size % tp_size:
            raise ValueError(f"ffn_hidden_size ({ffn_hidden_size}) is not divisible by "
                             f"tensor_model_parallel_size ({tp_size})")
        self.vocab_size = vocab_size
        self.ffn_hidden_size = ffn_hidden_size
        self.weight = torch.nn.Parameter(
            torch.empty(vocab_size, ffn_hidden_size // tp_size, device=device, dtype=dtype))
        set_tp_shard(self.weight, TPShard(dim=1))
        self.weight.is_stem_table = True
        self.grad_accumulator = RowGradAccumulator()

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table for `token_ids` (any shape), shape token_ids.shape + (d_ff/TP,)."""
        return stem_lookup(self.weight, token_ids, self.grad_accumulator)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, local_shape={tuple(self.weight.shape)}"


def is_stem_table(param: torch.Tensor) -> bool:
    return getattr(param, "is_stem_table", False)
