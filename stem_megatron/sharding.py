"""How a parameter's full (logical) tensor maps to the slice one tensor-parallel rank holds.

Every parameter is initialised as its part of one full tensor (model/init.py), so a model built
under any TP layout holds exactly the slices of the single-process model, and checkpoints can
store the full logical tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class TPGroup(Protocol):
    """What megatron-core's layers ask of a TP group when they size their shards: a
    torch.distributed ProcessGroup, or the dry run's LayoutGroup (planning/dry_run.py)."""

    def size(self) -> int: ...

    def rank(self) -> int: ...


@dataclass(frozen=True)
class TPShard:
    """`dim`: the split dimension. `chunks`: the full tensor is `chunks` blocks stacked along
    `dim` and each block is split separately (megatron's fused gate/up `linear_fc1` is
    [gate; up] in full and [gate_r; up_r] on rank r)."""

    dim: int
    chunks: int = 1


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, end) of a tensor of `rows` rows: the part of a vocab-sharded STEM table
    one data-parallel rank owns. Blocks follow torch.chunk (and DTensor Shard(0)): ceil-sized,
    the last one shorter."""

    start: int
    end: int
    rows: int

    @classmethod
    def of(cls, rows: int, rank: int, size: int) -> RowBlock:
        block = -(-rows // size)
        start = min(rank * block, rows)
        return cls(start, min(start + block, rows), rows)


def set_row_block(param: torch.nn.Parameter, block: RowBlock | None) -> None:
    param.row_block = block


def get_row_block(param: torch.Tensor) -> RowBlock | None:
    return getattr(param, "row_block", None)


def set_tp_shard(param: torch.nn.Parameter, shard: TPShard | None) -> None:
    param.tp_shard = shard
    # megatron-core's grad norm and clipping read its own TP attributes (a parameter without
    # them counts once per TP group); its layers set them only when they initialise weights,
    # and ours are initialised from full tensors instead.
    param.tensor_model_parallel = shard is not None
    param.partition_dim = shard.dim if shard is not None else -1
    param.partition_stride = 1


def get_tp_shard(param: torch.Tensor) -> TPShard | None:
    return getattr(param, "tp_shard", None)


def mark_shared_embedding(param: torch.nn.Parameter) -> None:
    """`param` is the tied embedding on the first or the last of several pipeline stages.
    megatron-core's DDP gives it a bucket of its own under the distributed optimizer, so both
    stages split it alike over DP and the stages' gradient sum (after the reduce-scatter)
    adds matching elements."""
    param.shared_embedding = True


def mark_tied_copy(param: torch.nn.Parameter) -> None:
    """`param` is the last pipeline stage's copy of the tied embedding: kept equal to the
    first stage's by summing their gradients, and counted once (there) in norms."""
    param.tied_copy = True
    param.shared = True  # megatron-core's norm and clipping count a `shared` parameter once
    mark_shared_embedding(param)


def is_tied_copy(param: torch.Tensor) -> bool:
    return getattr(param, "tied_copy", False)


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    shard = get_tp_shard(param)
    if shard is not None:
        shape[shard.dim] *= tp_size
    block = get_row_block(param)
    if block is not None:
        shape[0] = block.rows
    return tuple(shape)


def gather_full(slices: list[torch.Tensor], shard: TPShard | None) -> torch.Tensor:
    """The full tensor from every TP rank's slice, in rank order: each of the shard's `chunks`
    blocks is the ranks' pieces of it, concatenated."""
    if shard is None or len(slices) == 1:
        return slices[0]
    per_rank = [s.chunk(shard.chunks, dim=shard.dim) for s in slices]
    blocks = [torch.cat([p[c] for p in per_rank], dim=shard.dim) for c in range(shard.chunks)]
    return torch.cat(blocks, dim=shard.dim)
