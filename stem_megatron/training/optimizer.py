"""The optimizers of a run: megatron-core's for dense parameters, row-sparse AdamW for STEM tables.

Dense: `get_megatron_optimizer` over the DDP-wrapped chunks, as Megatron-LM builds it: AdamW on
the parameters themselves (fp32), on fp32 main copies of bf16 parameters (`train.bf16`), or on
fp32 main shards split over DP (`optim.use_distributed_optimizer`), optionally on the host
(`optim.optimizer_cpu_offload`). One LR schedule drives both: each group's LR is its base LR
times `schedule.factor(step)`. Global-norm clipping covers the dense gradients and the tables'
row gradients together, so megatron's own clipping is off and its step is run in its parts.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist
from megatron.core.optimizer import OptimizerConfig, clip_grads, get_megatron_optimizer

from stem_megatron.config import RunConfig
from stem_megatron.parallel.data_parallel import tables_hidden
from stem_megatron.parallel.state import ParallelState
from stem_megatron.stem.cache import HotRowCache
from stem_megatron.stem.sparse_adam import SparseRowAdamW
from stem_megatron.stem.storage import synchronize
from stem_megatron.stem.sync import gather_union_ids, sync_replicated_row_grads
from stem_megatron.stem.table import StemTable
from stem_megatron.training.model_chunks import named_modules, named_parameters, table_files
from stem_megatron.training.table_update import OverlappedTableUpdate


def dense_optimizer_config(config: RunConfig) -> OptimizerConfig:
    """megatron-core's optimizer settings from ours (Megatron's names on both sides). Its
    clipping is off: ours clips over dense and table gradients together. Weight decay follows
    megatron's rule: none for biases and 1-D parameters (norms)."""
    o, bf16 = config.optim, config.train.bf16
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=0.0,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
        optimizer_cpu_offload=o.optimizer_cpu_offload,
        optimizer_offload_fraction=o.optimizer_offload_fraction,
    )


class TrainingOptimizer:
    def __init__(
        self,
        wrapped_chunks: list[torch.nn.Module],
        chunks: list[torch.nn.Module],
        config: RunConfig,
        parallel: ParallelState,
    ):
        """`wrapped_chunks`: `chunks` in megatron-core's DDP (parallel/data_parallel.py)."""
        o = config.optim
        self.parallel = parallel
        self.clip_grad = o.clip_grad
        self.tables: dict[str, StemTable] = {
            name: mod for name, mod in named_modules(chunks) if isinstance(mod, StemTable)
        }
        table_params = {id(t.weight) for t in self.tables.values()}
        self.dense_params = [
            p for _, p in named_parameters(chunks) if id(p) not in table_params and p.requires_grad
        ]
        self.base_lr, self.weight_decay = o.lr, o.weight_decay
        with tables_hidden(chunks):
            self.dense = get_megatron_optimizer(dense_optimizer_config(config), wrapped_chunks)
        s = config.stem.optimizer
        self.table_lr = s.lr if s.lr is not None else o.lr
        files = table_files(config)  # the mmap tier maps the moments beside the tables
        self.sparse = SparseRowAdamW(
            {name: t.weight for name, t in self.tables.items()},
            lr=self.table_lr,
            betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_eps,
            weight_decay=s.weight_decay,
            mode=s.mode,
            allocate=files.zeros if files else None,
        )
        self.overlap = None
        if (
            s.overlap_update
            and o.clip_grad == 0
            and self.tables
            and all(t.on_host for t in self.tables.values())
            and (parallel.dp_size == 1 or self.vocab_sharded)
        ):
            self.overlap = OverlappedTableUpdate(self.sparse, self.tables)
        self._updated_early: set[str] = set()
        # Set by the trainer when host tables have a hot-row cache: every host row this
        # optimizer writes is then copied to it (the host stays the master copy).
        self.cache: HotRowCache | None = None
        self._refresh_bytes = 0

    def refresh_cache(self, rows: dict[str, torch.Tensor] | None = None) -> None:
        """Copy to the cache the cached rows among `rows` (None: all of them), after the host
        rows were written."""
        if self.cache is not None:
            self._refresh_bytes += (
                self.cache.refresh_all() if rows is None else self.cache.refresh(rows)
            )

    @contextlib.contextmanager
    def overlapping_table_updates(self, lr_factor: float, micro_batches: int):
        """Around a step's schedule: host tables whose gradient is final start their update
        while the backward continues (when allowed: see training/table_update.py)."""
        if self.overlap is None:
            yield
            return
        self.overlap.arm(self.table_lr * lr_factor, micro_batches)
        try:
            yield
        finally:
            self._updated_early = self.overlap.finish()

    @property
    def dense_parts(self) -> list:
        """megatron-core's optimizers behind `dense` (a ChainedOptimizer holds several)."""
        return getattr(self.dense, "chained_optimizers", [self.dense])

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        for table in self.tables.values():
            table.grad_accumulator.clear()

    def unique_rows(self) -> int:
        """Distinct table rows with a gradient this step over all DP replicas (once synced),
        summed over this rank's tables."""
        rows = sum(t.grad_accumulator.num_rows for t in self.tables.values())
        if self.vocab_sharded:  # each owner counts its own rows
            count = torch.tensor(rows, device=self.parallel.device)
            dist.all_reduce(count, group=self.parallel.dp_group)
            rows = int(count.item())
        return rows

    def settle_rows_to_read(self, token_ids: torch.Tensor) -> None:
        """Exact mode: settle, before the step reads them, the table rows its tokens select,
        so the forward sees what dense AdamW would hold. Every replica settles the same rows
        (the union over DP ranks), which keeps replicated tables bitwise identical; under the
        vocab-sharded layout each owner settles the union's rows it owns."""
        if self.sparse.mode != "exact" or not self.tables:
            return
        ids = torch.unique(token_ids)
        if self.parallel.dp_size > 1:
            ids = gather_union_ids(ids.to(self.parallel.device), self.parallel.dp_group)
        rows = {}
        for name, table in self.tables.items():
            block = table.row_block
            if block is not None:
                ids_here = ids[(ids >= block.start) & (ids < block.end)] - block.start
            else:
                ids_here = ids
            rows[name] = ids_here.to(table.weight.device)
        # Only rows that owe idle steps change; most hot rows were updated last step.
        written = self.sparse.unsettled(rows) if self.cache is not None else None
        self.sparse.settle_rows(rows)
        if written is not None:
            self.refresh_cache(written)

    @property
    def vocab_sharded(self) -> bool:
        return any(t.row_block is not None for t in self.tables.values())

    def sync_table_grads(self) -> None:
        """Average table row gradients over data-parallel replicas (DDP does the dense ones).
        Vocab-sharded tables need nothing: their lookups reduce-scattered to the owners."""
        if self.parallel.dp_size == 1 or self.vocab_sharded:
            return
        for table in self.tables.values():
            # On the compute device whatever the table's storage: the collective runs there.
            sync_replicated_row_grads(
                table.grad_accumulator,
                self.parallel.dp_group,
                table.weight.shape[1],
                self.parallel.device,
            )

    def grad_norm(self) -> float:
        """L2 norm over every dense gradient (megatron-core's norm of the main gradients: TP
        duplicates and the tied embedding's copy counted once, over the whole model) and every
        table's combined row gradient."""
        dense = float(self.dense.get_grad_norm() or 0.0)
        tables = torch.zeros((), dtype=torch.float32, device=self.parallel.device)
        for table in self.tables.values():  # column slices: sharded like the gate
            if not table.grad_accumulator.is_empty:
                tables += table.grad_accumulator.squared_norm().float()
        if self.vocab_sharded:  # each DP rank holds the gradient of its own rows
            dist.all_reduce(tables, group=self.parallel.dp_group)
        if self.parallel.tp_size * self.parallel.pp_size > 1:
            dist.all_reduce(tables, group=self.parallel.model_parallel_group)
        return math.sqrt(dense**2 + tables.item())

    def step(self, lr_factor: float) -> dict[str, float]:
        """Sync table rows over DP, clip, then update dense parameters and touched table rows.
        Returns metrics."""
        self.sync_table_grads()
        unique_rows = self.unique_rows()
        self.dense.prepare_grads()  # main gradients from the DDP buffers (no loss scaling)
        norm = self.grad_norm()
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"gradient norm is {norm}: training diverged (lower optim.lr or check the data)"
            )
        if self.clip_grad > 0 and norm > self.clip_grad:
            for part in self.dense_parts:
                clip_grads.clip_grad_by_total_norm_fp32(part.get_parameters(), self.clip_grad, norm)
            for table in self.tables.values():
                table.grad_accumulator.scale_(self.clip_grad / (norm + 1e-6))
        # What megatron's OptimizerParamScheduler sets: its groups carry multipliers (no
        # weight decay for biases and norms: wd_mult 0), the torch optimizer reads the products.
        for group in self.dense.param_groups:
            group["lr"] = self.base_lr * lr_factor * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        self.dense.step_with_ready_grads()
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
            self.sparse.step(grads, lr=self.table_lr * lr_factor)
        else:  # the step was started by `overlapping_table_updates`
            for name, (ids, grad) in grads.items():
                if name not in self._updated_early:
                    self.sparse.update_table(name, ids, grad, self.overlap.lr)
        synchronize(self.parallel.device)
        sparse_ms = (time.perf_counter() - start) * 1e3
        overlapped = len(self._updated_early)
        if self.overlap is not None:  # the wait at the end of the backward counts too
            sparse_ms += self.overlap.wait_s * 1e3
            self._updated_early = set()
        self.refresh_cache({name: ids for name, (ids, _) in grads.items()})
        refresh_bytes, self._refresh_bytes = self._refresh_bytes, 0
        return {
            "optim/grad_norm": norm,
            "optim/lr": self.base_lr * lr_factor,
            "optim/table_lr": self.table_lr * lr_factor,
            "stem/unique_rows": unique_rows,
            "stem/bytes_d2h": float(bytes_d2h),
            "stem/sparse_optim_ms": sparse_ms,
            "stem/overlapped_tables": float(overlapped),
            "stem/cache_refresh_bytes": float(refresh_bytes),
        }
