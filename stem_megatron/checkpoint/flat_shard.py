"""A flat range of a parameter's elements as a piece of the parameter's full logical tensor.

megatron-core's distributed optimizer gives each data-parallel rank a contiguous range of every
grad bucket, so a rank holds an arbitrary flat range [start, end) of a parameter's main values
and Adam moments. DCP stores rectangular chunks with global offsets, and a flat range of a
row-major tensor is a few boxes (a partial first row, whole rows, a partial last row; the same
again inside a partial row), each a contiguous run of the range. Saved as those boxes, the
checkpoint keeps the key and full shape the whole tensor has, so any layout loads it, with or
without the distributed optimizer; no rank gathers anything to save or to load.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from stem_megatron.checkpoint.model_state import CheckpointMeshes, tp_block

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def flat_range_boxes(shape: tuple[int, ...], start: int, end: int) -> list[Box]:
    """Boxes covering elements [start, end) of a row-major tensor of `shape`, in element order;
    each box is a contiguous run of those elements."""
    if start >= end:
        return []
    if len(shape) == 1:
        return [((start,), (end - start,))]
    row = math.prod(shape[1:])
    first, first_col = divmod(start, row)
    last, last_col = divmod(end, row)

    def within(index: int, a: int, b: int) -> list[Box]:
        return [((index, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], a, b)]

    if first == last:
        return within(first, first_col, last_col)
    boxes = []
    if first_col:
        boxes += within(first, first_col, row)
        first += 1
    if last > first:
        boxes.append(((first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:])))
    if last_col:
        boxes += within(last, 0, last_col)
    return boxes


def flat_shard_view(
    flat: torch.Tensor, like: torch.Tensor, start: int, meshes: CheckpointMeshes
) -> torch.Tensor:
    """`flat`, elements [start, start + len) of this rank's flattened piece of parameter `like`
    (or of an optimizer state shaped like it), as a ShardedTensor of the full logical tensor.
    Shares storage, so DCP loads into it in place."""
    shape, dim = tp_block(like)
    full, mine, blocks = list(shape), (0,) * len(shape), []  # blocks: the other TP ranks'
    if dim is not None:
        full[dim] *= meshes.tp.size()
        blocks = [
            tuple(t * shape[dim] if d == dim else 0 for d in range(len(shape)))
            for t in range(meshes.tp.size())
        ]
        mine = blocks.pop(meshes.tp.get_local_rank())
    end, rank = start + flat.numel(), dist.get_rank()

    def placed(boxes: list[Box], block: tuple[int, ...], on: int) -> list[ShardMetadata]:
        return [
            ShardMetadata(
                [o + b for o, b in zip(offsets, block)], list(sizes), f"rank:{on}/{flat.device}"
            )
            for offsets, sizes in boxes
        ]

    local, cursor = [], 0
    for meta in placed(flat_range_boxes(shape, start, end), mine, rank):
        n = math.prod(meta.shard_sizes)
        local.append(Shard(flat[cursor : cursor + n].view(meta.shard_sizes), meta))
        cursor += n
    # ShardedTensor wants metadata that tiles the whole tensor, but only this rank's own
    # shards reach DCP: the rest (the range's complement in this block, the other TP ranks'
    # blocks) is described as held by another rank, whichever (megatron-core's
    # dist_checkpointing does the same).
    other = (rank + 1) % dist.get_world_size()
    numel = math.prod(shape)
    rest = placed(
        flat_range_boxes(shape, 0, start) + flat_range_boxes(shape, end, numel), mine, other
    )
    for block in blocks:
        rest += placed([((0,) * len(shape), shape)], block, other)
    metadata = ShardedTensorMetadata(
        [s.metadata for s in local] + rest,
        torch.Size(full),
        TensorProperties(
            dtype=flat.dtype,
            layout=torch.strided,
            requires_grad=False,
            memory_format=torch.contiguous_format,
            pin_memory=False,
        ),
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, metadata)
