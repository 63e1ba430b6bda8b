"""The `vocab_sharded` data-parallel layout of a STEM table: each DP rank owns a block of rows
(and their optimizer state); nobody holds the whole table.

Lookup, per micro-batch: all-gather the ids every rank needs and form their sorted union; the
union splits into one contiguous segment per owner (blocks are contiguous); each owner
contributes its segment's rows and an all-gather gives every rank all union rows. Backward:
each rank scatters its row gradients into a union-sized buffer and a reduce-scatter hands each
owner the summed gradient of its segment. Collectives only, sized by the union, never by the
vocabulary; no all-to-all (the ids are known before the lookup).

Host-resident tables (`stem.storage=host`): the trainer forms each micro-batch's plan before
the step (`plan_lookup`, the id exchange), the prefetcher stages the rows this rank owns of
the union on the compute device, and the lookup starts from them; only the row all-gather is
left in the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from stem_megatron.sharding import RowBlock
from stem_megatron.stem.lookup import RowGradAccumulator, row_index
from stem_megatron.stem.sync import gather_union_ids


@dataclass
class LookupPlan:
    """The row exchange of one micro-batch, the same on every rank of the group (it does not
    depend on the order of this rank's ids, which each lookup sees in its own layout)."""

    union: torch.Tensor  # sorted ids every DP rank needs this micro-batch
    bounds: list[int]  # union[bounds[r]:bounds[r+1]] is owned by rank r

    @property
    def longest(self) -> int:
        return max(b - a for a, b in zip(self.bounds, self.bounds[1:]))

    def owned(self, rank: int, block: RowBlock) -> torch.Tensor:
        """Local row indices, in `block`, of the union rows `rank` owns (sorted)."""
        return self.union[self.bounds[rank] : self.bounds[rank + 1]] - block.start


def plan_lookup(ids: torch.Tensor, block: RowBlock, group: dist.ProcessGroup) -> LookupPlan:
    """Collective over `group`: which rows every rank needs for `ids` and who owns them."""
    world = dist.get_world_size(group)
    union = gather_union_ids(row_index(ids)[0], group)
    starts = torch.tensor(
        [RowBlock.of(block.rows, r, world).start for r in range(world)] + [block.rows],
        device=union.device,
    )
    return LookupPlan(union, torch.searchsorted(union, starts).tolist())


def _padded(segments: list[torch.Tensor], longest: int, width: int, like: torch.Tensor):
    out = like.new_zeros(len(segments), longest, width)
    for r, seg in enumerate(segments):
        out[r, : seg.shape[0]] = seg
    return out


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        table,
        ids,
        block: RowBlock,
        group,
        accumulator: RowGradAccumulator,
        plan: LookupPlan | None,
        owned_rows: torch.Tensor | None,
    ):
        plan = plan if plan is not None else plan_lookup(ids, block, group)
        unique, inverse = row_index(ids)
        local_pos = torch.searchsorted(plan.union, unique)  # this rank's rows in the union
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        width = table.shape[1]
        if owned_rows is None:  # a host table is read here when nothing staged its rows
            owned_rows = table.index_select(0, plan.owned(rank, block).to(table.device))
        send = torch.zeros(plan.longest, width, dtype=table.dtype, device=ids.device)
        send[: owned_rows.shape[0]] = owned_rows
        gathered = send.new_empty(world * plan.longest, width)  # gloo wants it flat
        dist.all_gather_into_tensor(gathered, send, group=group)
        gathered = gathered.view(world, plan.longest, width)
        rows = torch.cat([gathered[r, : plan.bounds[r + 1] - plan.bounds[r]] for r in range(world)])
        ctx.plan, ctx.block, ctx.group, ctx.accumulator = plan, block, group, accumulator
        ctx.save_for_backward(local_pos, inverse)
        return rows[local_pos][inverse].view(*ids.shape, width)

    @staticmethod
    def backward(ctx, grad_out):
        plan, group = ctx.plan, ctx.group
        local_pos, inverse = ctx.saved_tensors
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        width = grad_out.shape[-1]
        rows_grad = torch.zeros(
            local_pos.numel(), width, dtype=torch.float32, device=grad_out.device
        )
        rows_grad.index_add_(0, inverse, grad_out.reshape(-1, width).float())
        union_grad = rows_grad.new_zeros(plan.union.numel(), width)
        union_grad[local_pos] = rows_grad
        segments = [union_grad[a:b] for a, b in zip(plan.bounds, plan.bounds[1:])]
        send = _padded(segments, plan.longest, width, union_grad).view(-1, width)
        mine = rows_grad.new_empty(plan.longest, width)
        dist.reduce_scatter_tensor(mine, send, group=group)
        count = plan.bounds[rank + 1] - plan.bounds[rank]
        # Averaged over replicas, as DDP averages the dense gradients. Added even when this
        # rank owns none of the rows: one add per backward, which an overlapped update counts.
        ctx.accumulator.add(plan.owned(rank, ctx.block), mine[:count] / world)
        return None, None, None, None, None, None, None


def vocab_sharded_lookup(
    table: torch.nn.Parameter,
    ids: torch.Tensor,
    block: RowBlock,
    group: dist.ProcessGroup,
    accumulator: RowGradAccumulator,
    plan: LookupPlan | None = None,
    owned_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows for `ids` (on the compute device) from a table whose rows are spread over
    `group`; this rank holds `block`. Every rank of the group must call it together
    (micro-batches run in lockstep). The accumulator receives the gradient of this rank's own
    rows, by local row index. `plan` and `owned_rows` (this rank's rows of the plan's union,
    on the compute device), when given, were prepared ahead by the prefetch."""
    return _ShardedLookup.apply(table, ids, block, group, accumulator, plan, owned_rows)
