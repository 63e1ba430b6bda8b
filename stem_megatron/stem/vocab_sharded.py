"""The `vocab_sharded` data-parallel layout of a STEM table: each DP rank owns a block of rows
(and their optimizer state); nobody holds the whole table.

Lookup, per micro-batch: all-gather the ids every rank needs and form their sorted union; the
union splits into one contiguous segment per owner (blocks are contiguous); each owner
contributes its segment's rows and an all-gather gives every rank all union rows. Backward:
each rank scatters its row gradients into a union-sized buffer and a reduce-scatter hands each
owner the summed gradient of its segment. Collectives only, sized by the union, never by the
vocabulary; no all-to-all (the ids are known before the lookup).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from stem_megatron.model.sharding import RowBlock
from stem_megatron.stem.lookup import RowGradAccumulator
from stem_megatron.stem.sync import gather_union_ids


@dataclass
class _Plan:
    union: torch.Tensor  # sorted ids every DP rank needs this micro-batch
    bounds: list[int]  # union[bounds[r]:bounds[r+1]] is owned by rank r
    local_pos: torch.Tensor  # position in `union` of each of this rank's unique ids
    inverse: torch.Tensor  # this rank's ids -> its unique ids

    @property
    def longest(self) -> int:
        return max(b - a for a, b in zip(self.bounds, self.bounds[1:]))


def _plan(ids: torch.Tensor, block: RowBlock, group: dist.ProcessGroup) -> _Plan:
    world = dist.get_world_size(group)
    unique, inverse = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True)
    union = gather_union_ids(unique, group)
    starts = torch.tensor([RowBlock.of(block.rows, r, world).start for r in range(world)]
                          + [block.rows], device=union.device)
    bounds = torch.searchsorted(union, starts).tolist()
    return _Plan(union, bounds, torch.searchsorted(union, unique), inverse)


def _padded(segments: list[torch.Tensor], longest: int, width: int, like: torch.Tensor):
    out = like.new_zeros(len(segments), longest, width)
    for r, seg in enumerate(segments):
        out[r, :seg.shape[0]] = seg
    return out


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, ids, block: RowBlock, group, accumulator: RowGradAccumulator):
        plan = _plan(ids, block, group)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        width = table.shape[1]
        mine = plan.union[plan.bounds[rank]:plan.bounds[rank + 1]] - block.start
        send = table.new_zeros(plan.longest, width)
        send[:mine.numel()] = table.index_select(0, mine)
        gathered = table.new_empty(world * plan.longest, width)  # gloo wants it flat
        dist.all_gather_into_tensor(gathered, send, group=group)
        gathered = gathered.view(world, plan.longest, width)
        rows = torch.cat([gathered[r, :plan.bounds[r + 1] - plan.bounds[r]]
                          for r in range(world)])
        ctx.plan, ctx.block, ctx.group, ctx.accumulator = plan, block, group, accumulator
        return rows[plan.local_pos][plan.inverse].view(*ids.shape, width)

    @staticmethod
    def backward(ctx, grad_out):
        plan, group = ctx.plan, ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        width = grad_out.shape[-1]
        rows_grad = torch.zeros(plan.local_pos.numel(), width, dtype=torch.float32,
                                device=grad_out.device)
        rows_grad.index_add_(0, plan.inverse, grad_out.reshape(-1, width).float())
        union_grad = rows_grad.new_zeros(plan.union.numel(), width)
        union_grad[plan.local_pos] = rows_grad
        segments = [union_grad[a:b] for a, b in zip(plan.bounds, plan.bounds[1:])]
        send = _padded(segments, plan.longest, width, union_grad).view(-1, width)
        mine = rows_grad.new_empty(plan.longest, width)
        dist.reduce_scatter_tensor(mine, send, group=group)
        count = plan.bounds[rank + 1] - plan.bounds[rank]
        if count:
            # Averaged over replicas, as DDP averages the dense gradients.
            owned = plan.union[plan.bounds[rank]:plan.bounds[rank + 1]] - ctx.block.start
            ctx.accumulator.add(owned, mine[:count] / world)
        return None, None, None, None, None


def vocab_sharded_lookup(table: torch.nn.Parameter, ids: torch.Tensor, block: RowBlock,
                         group: dist.ProcessGroup, accumulator: RowGradAccumulator) -> torch.Tensor:
    """Rows for `ids` from a table whose rows are spread over `group`; this rank holds
    `block`. Every rank of the group must call it together (micro-batches run in lockstep).
    The accumulator receives the gradient of this rank's own rows, by local row index."""
    return _ShardedLookup.apply(table, ids, block, group, accumulator)
