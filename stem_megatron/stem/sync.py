"""Data-parallel synchronisation of STEM table gradients, row-sparse (`replicated` layout).

Each DP rank touched some rows. All-gather the ids every rank touched, form their sorted
union, scatter the local row gradients into a [|union|, d_ff/TP] buffer and all-reduce it.
Bytes moved scale with rows touched, never with the vocabulary (a dense table-gradient
all-reduce would move V x d_ff/TP x 4 bytes per table per step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from stem_megatron.stem.lookup import RowGradAccumulator


def gather_union_ids(ids: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sorted union of every rank's 1-D id tensor (ranks may hold different counts)."""
    world = dist.get_world_size(group)
    count = torch.tensor([ids.numel()], dtype=torch.long, device=ids.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = torch.cat(counts).tolist()  # the one host sync: the buffers' length
    padded = torch.full((max(sizes),), -1, dtype=torch.long, device=ids.device)
    padded[: ids.numel()] = ids
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    every = torch.cat([g[:size] for g, size in zip(gathered, sizes)])
    return torch.unique(every, sorted=True)


def sync_replicated_row_grads(
    accumulator: RowGradAccumulator, group: dist.ProcessGroup, width: int, device: torch.device
) -> int:
    """Average a table's row gradient over the DP group in place; returns the union size."""
    world = dist.get_world_size(group)
    ids, grad = accumulator.reduce()
    union = gather_union_ids(ids, group)
    buffer = torch.zeros(union.numel(), width, dtype=torch.float32, device=device)
    if ids.numel():
        buffer[torch.searchsorted(union, ids)] = grad
    dist.all_reduce(buffer, group=group)
    buffer /= world
    accumulator.clear()
    if union.numel():
        accumulator.add(union, buffer)
    return union.numel()
