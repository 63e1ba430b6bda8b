"""StemTables: a rank's STEM tables and everything that happens to them, behind a few verbs.

The trainer holds one `StemTables` over all its model chunks (under interleaved pipelining a
rank's chunks share one staging thread, one table optimizer and one gradient norm). A table's
life in one training step, in the order the verbs run (docs/architecture.md draws it):

    zero_grad()           the row-gradient accumulators start empty
    with prepare(ids, lr):
        exact mode: settle the rows the step reads (idle steps replayed, as dense AdamW)
        overlap: arm each host table's update to start when its gradient is final
        host tiers: stage each micro-batch's rows on the device, ahead of its lookups
        -- the schedule runs: lookups read rows, backward adds row gradients --
    reduce_grads()        replicated layout: average row gradients over DP (union of rows)
    squared_norm()        their part of the global gradient norm (over DP and TP x PP)
    scale_(factor)        global-norm clipping
    step(lr)              row-sparse AdamW on the touched rows (unless the overlap did it),
                          and the hot-row cache refreshed from the host rows written

The layout (replicated or vocab-sharded rows over DP) is the tables' own (`row_block`); the
storage tier is decided when the model is built (stem/placement.py). The dense optimizer knows
nothing of tables; the trainer combines the two norms.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from stem_megatron.config import RunConfig
from stem_megatron.modes import TableOptimizerMode
from stem_megatron.stem.cache import HotRowCache, hot_ids, token_counts
from stem_megatron.stem.overlap import OverlappedTableUpdate
from stem_megatron.stem.placement import TablePlacement
from stem_megatron.stem.prefetch import RowPrefetcher, RowRequest
from stem_megatron.stem.sparse_adam import SparseRowAdamW
from stem_megatron.stem.storage import synchronize
from stem_megatron.stem.sync import gather_union_ids, sync_replicated_row_grads
from stem_megatron.stem.table import StemTable
from stem_megatron.stem.vocab_sharded import plan_lookup

if TYPE_CHECKING:  # the runtime layout object; only its sizes, ranks and groups are read
    from stem_megatron.parallel.state import ParallelState


def find_tables(chunks: list[torch.nn.Module]) -> dict[str, StemTable]:
    """The STEM tables of `chunks`, by their global module names."""
    return {
        name: module
        for chunk in chunks
        for name, module in chunk.named_modules()
        if isinstance(module, StemTable)
    }


class StemTables:
    """`chunks`: this rank's model chunks, built and placed (training/model_chunks.py).
    `train_tokens`: the training data's ids, counted to choose the hot-row cache."""

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        config: RunConfig,
        parallel: ParallelState,
        train_tokens: np.ndarray | None = None,
    ):
        o, s = config.optim, config.stem.optimizer
        self.tables = find_tables(chunks)
        self.parallel = parallel
        self.vocab_sharded = any(t.row_block is not None for t in self.tables.values())
        self.lr = s.lr if s.lr is not None else o.lr
        placement = TablePlacement.of(config, parallel.device)
        self.optimizer = SparseRowAdamW(
            {name: t.weight for name, t in self.tables.items()},
            lr=self.lr,
            betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_eps,
            weight_decay=s.weight_decay,
            mode=s.mode,
            allocate=placement.state_allocator,
        )
        self.overlap = None
        if (
            s.overlap_update
            and o.clip_grad == 0
            and self.tables
            and all(t.on_host for t in self.tables.values())
            and (parallel.dp_size == 1 or self.vocab_sharded)
        ):
            self.overlap = OverlappedTableUpdate(self.optimizer, self.tables)
        self.cache, self.prefetcher = self._host_staging(config, train_tokens)
        for name, table in self.tables.items():
            table.connect(parallel.dp_group, self.prefetcher, name)
        self._updated_early: set[str] = set()
        self._refresh_bytes = 0
        self._unique_rows = 0
        self._staging_metrics: dict[str, float] = {}

    def _host_staging(
        self, config: RunConfig, train_tokens: np.ndarray | None
    ) -> tuple[HotRowCache | None, RowPrefetcher | None]:
        """One prefetcher for every host-resident table of this rank (None: no host tables),
        with a cache of the `stem.cache_rows` ids most frequent in the training data."""
        host = {name: t.weight for name, t in self.tables.items() if t.on_host}
        if not host:
            return None, None
        cache = None
        if config.stem.cache_rows and train_tokens is not None:
            counts = token_counts(train_tokens, config.model.vocab_size)
            block = self._host_row_block
            if block is not None:  # vocab-sharded: this rank caches rows of its own block
                counts = counts[block.start : block.end]
            cache = HotRowCache(host, hot_ids(counts, config.stem.cache_rows), self.parallel.device)
        return cache, RowPrefetcher(host, self.parallel.device, cache)

    @property
    def _host_row_block(self):
        return next((t.row_block for t in self.tables.values() if t.on_host), None)

    @property
    def mode(self) -> TableOptimizerMode:
        return self.optimizer.mode

    # -- one step ----------------------------------------------------------------------
    def zero_grad(self) -> None:
        for table in self.tables.values():
            table.grad_accumulator.clear()

    @contextlib.contextmanager
    def prepare(self, micro_batches: list[torch.Tensor], lr_factor: float | None) -> Iterator[None]:
        """Around a step's schedule over `micro_batches` (the ids each one's forward reads):
        settle the rows they read (exact mode), arm the overlapped update when training
        (`lr_factor` not None), and stage host rows ahead of the lookups. The staging thread
        is joined when the block ends, before any update waits or runs."""
        self._settle_rows_to_read(torch.cat([ids.reshape(-1) for ids in micro_batches]))
        with self._overlapping(lr_factor, len(micro_batches)), self._staging(micro_batches):
            yield

    @contextlib.contextmanager
    def _overlapping(self, lr_factor: float | None, micro_batches: int) -> Iterator[None]:
        if self.overlap is None or lr_factor is None:
            yield
            return
        self.overlap.arm(self.lr * lr_factor, micro_batches)
        try:
            yield
        finally:
            self._updated_early = self.overlap.finish()

    @contextlib.contextmanager
    def _staging(self, micro_batches: list[torch.Tensor]) -> Iterator[None]:
        self._staging_metrics = {"stem/bytes_h2d": 0.0, "stem/prefetch_stall_ms": 0.0}
        if self.prefetcher is None:
            yield
            return
        with self.prefetcher.prefetching([self._row_request(ids) for ids in micro_batches]):
            yield
        self._staging_metrics.update(self.prefetcher.finish())

    def _row_request(self, ids: torch.Tensor) -> RowRequest:
        """The host rows a micro-batch reads. Vocab-sharded: the rows this rank owns of the
        union every DP rank needs, found by exchanging ids now (a collective, so before the
        schedule, in the same order on every rank), and the plan the lookups then follow."""
        block = self._host_row_block
        if block is None:
            return RowRequest.of_ids(ids)
        p = self.parallel
        plan = plan_lookup(ids.to(p.device), block, p.dp_group)
        return RowRequest(plan.owned(p.dp_rank, block).cpu(), ids.numel(), plan)

    def _settle_rows_to_read(self, token_ids: torch.Tensor) -> None:
        """Exact mode: settle, before the step reads them, the table rows its tokens select,
        so the forward sees what dense AdamW would hold. Every replica settles the same rows
        (the union over DP ranks), which keeps replicated tables bitwise identical; under the
        vocab-sharded layout each owner settles the union's rows it owns."""
        if self.mode != TableOptimizerMode.EXACT or not self.tables:
            return
        ids = torch.unique(token_ids)
        if self.parallel.dp_size > 1:
            ids = gather_union_ids(ids.to(self.parallel.device), self.parallel.dp_group)
        rows = {}
        for name, table in self.tables.items():
            block = table.row_block
            here = ids if block is None else ids[(ids >= block.start) & (ids < block.end)]
            rows[name] = (here - (block.start if block is not None else 0)).to(table.weight.device)
        # Only rows that owe idle steps change; most hot rows were updated last step.
        written = self.optimizer.unsettled(rows) if self.cache is not None else None
        self.optimizer.settle_rows(rows)
        if written is not None:
            self._refresh_cache(written)

    def reduce_grads(self) -> None:
        """Average row gradients over data-parallel replicas (megatron's DDP does the dense
        ones) and count the distinct rows touched. Vocab-sharded tables need no sync: their
        lookups reduce-scattered the gradients to the rows' owners."""
        p = self.parallel
        if p.dp_size > 1 and not self.vocab_sharded:
            for table in self.tables.values():
                # On the compute device whatever the table's storage: the collective runs there.
                sync_replicated_row_grads(
                    table.grad_accumulator, p.dp_group, table.weight.shape[1], p.device
                )
        rows = sum(t.grad_accumulator.num_rows for t in self.tables.values())
        if self.vocab_sharded:  # each owner counts its own rows
            count = torch.tensor(rows, device=p.device)
            dist.all_reduce(count, group=p.dp_group)
            rows = int(count.item())
        self._unique_rows = rows

    def squared_norm(self) -> torch.Tensor:
        """Squared L2 norm of every table's row gradient over the whole model: column slices
        over TP, stages over PP, and (vocab-sharded) row blocks over DP. 0-d fp32."""
        p = self.parallel
        total = torch.zeros((), dtype=torch.float32, device=p.device)
        for table in self.tables.values():
            if not table.grad_accumulator.is_empty:
                total += table.grad_accumulator.squared_norm().float()
        if self.vocab_sharded:
            dist.all_reduce(total, group=p.dp_group)
        if p.tp_size * p.pp_size > 1:
            dist.all_reduce(total, group=p.model_parallel_group)
        return total

    def scale_(self, factor: float) -> None:
        for table in self.tables.values():
            table.grad_accumulator.scale_(factor)

    def step(self, lr_factor: float) -> dict[str, float]:
        """Update the touched rows at the scheduled LR (the overlap may have updated some
        already); refresh their cached copies. Returns the step's table metrics, staging
        included."""
        lr = self.lr * lr_factor
        grads = {
            name: t.grad_accumulator.reduce()
            for name, t in self.tables.items()
            if not t.grad_accumulator.is_empty
        }
        # Host tables: the sparse optimizer moves the row gradients (ids and rows) to host.
        bytes_d2h = sum(
            ids.numel() * ids.element_size() + grad.numel() * grad.element_size()
            for name, (ids, grad) in grads.items()
            if self.tables[name].on_host
        )
        synchronize(self.parallel.device)  # time the table update alone, not queued compute
        start = time.perf_counter()
        if self.overlap is None:
            self.optimizer.step(grads, lr=lr)
        else:  # the step was started when the overlap was armed
            for name, (ids, grad) in grads.items():
                if name not in self._updated_early:
                    self.optimizer.update_table(name, ids, grad, self.overlap.lr)
        synchronize(self.parallel.device)
        update_ms = (time.perf_counter() - start) * 1e3
        overlapped = len(self._updated_early)
        if self.overlap is not None:  # the wait at the end of the backward counts too
            update_ms += self.overlap.wait_s * 1e3
            self._updated_early = set()
        self._refresh_cache({name: ids for name, (ids, _) in grads.items()})
        refresh_bytes, self._refresh_bytes = self._refresh_bytes, 0
        staged = self._staging_metrics
        return {
            **staged,
            # Refreshing cached rows is host-to-device traffic too.
            "stem/bytes_h2d": staged["stem/bytes_h2d"] + refresh_bytes,
            "optim/table_lr": lr,
            "stem/unique_rows": self._unique_rows,
            "stem/bytes_d2h": float(bytes_d2h),
            "stem/sparse_optim_ms": update_ms,
            "stem/overlapped_tables": float(overlapped),
            "stem/cache_refresh_bytes": float(refresh_bytes),
        }

    def _refresh_cache(self, rows: dict[str, torch.Tensor] | None = None) -> None:
        """Copy to the cache the cached rows among `rows` (None: all), once the host rows
        were written: the host stays the master copy."""
        if self.cache is not None:
            self._refresh_bytes += (
                self.cache.refresh_all() if rows is None else self.cache.refresh(rows)
            )

    # -- checkpoints -------------------------------------------------------------------
    def weights(self) -> dict[str, torch.nn.Parameter]:
        return {name: t.weight for name, t in self.tables.items()}

    def state_dict(self) -> dict:
        """The table optimizer's state (exact mode settles every row first, so the weights
        the checkpoint saves beside it are current): {"step", "tables": {name: moments}}."""
        state = self.optimizer.state_dict()
        self._refresh_cache()  # settling wrote host rows
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        self.rows_replaced()

    def rows_replaced(self) -> None:
        """The weights were loaded in place (a checkpoint): cached copies are taken again."""
        self._refresh_cache()

    def check_mode(self, saved_mode: str | None, checkpoint) -> None:
        """Lazy and exact table states look alike but mean different things (exact-mode
        moments carry every idle step's decay): resuming one as the other is refused."""
        if saved_mode is not None and saved_mode != self.mode:
            raise ValueError(
                f"checkpoint {checkpoint} was trained with stem.optimizer.mode={saved_mode}, "
                f"this run uses {self.mode}: resume with stem.optimizer.mode={saved_mode}"
            )
