"""The optimizers of a run: fused AdamW for dense parameters, row-sparse AdamW for STEM tables.

One LR schedule drives both: each group's LR is its base LR times `schedule.factor(step)`.
Global-norm clipping covers the dense gradients and the tables' row gradients together.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist

from stem_megatron.config import RunConfig
from stem_megatron.model.sharding import get_tp_shard, is_tied_copy
from stem_megatron.parallel.state import ParallelState
from stem_megatron.stem.cache import HotRowCache
from stem_megatron.stem.sparse_adam import SparseRowAdamW
from stem_megatron.stem.storage import synchronize
from stem_megatron.stem.sync import gather_union_ids, sync_replicated_row_grads
from stem_megatron.stem.table import StemTable
from stem_megatron.training.model_chunks import named_modules, named_parameters, table_files
from stem_megatron.training.table_update import OverlappedTableUpdate


TIED_EMBEDDING = "embedding.word_embeddings.weight"


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # Megatron's rule: no decay for norms and biases (1-D parameters).
    return param.ndim == 1 or name.endswith(".bias")


class TrainingOptimizer:
    def __init__(self, chunks: list[torch.nn.Module], config: RunConfig, parallel: ParallelState):
        o = config.optim
        self.parallel = parallel
        self.clip_grad = o.clip_grad
        self.tables: dict[str, StemTable] = {
            name: mod for name, mod in named_modules(chunks) if isinstance(mod, StemTable)}
        table_params = {id(t.weight) for t in self.tables.values()}
        decay, no_decay = [], []
        for name, param in named_parameters(chunks):
            if id(param) in table_params or not param.requires_grad:
                continue
            (no_decay if _no_weight_decay(name, param) else decay).append(param)
        self.dense_params = decay + no_decay
        # Tied embedding under PP: the first stage's weight and the last stage's copy.
        tied_across_stages = (parallel.pp_size > 1
                              and not config.model.untie_embeddings_and_output_weights)
        tied = dict(named_parameters(chunks)).get(TIED_EMBEDDING) if tied_across_stages else None
        self.tied_embedding = [tied] if tied is not None else []
        self.base_lr = o.lr
        self.dense = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, fused=True)
        s = config.stem.optimizer
        self.table_lr = s.lr if s.lr is not None else o.lr
        files = table_files(config)  # the mmap tier maps the moments beside the tables
        self.sparse = SparseRowAdamW(
            {name: t.weight for name, t in self.tables.items()}, lr=self.table_lr,
            betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=s.weight_decay,
            mode=s.mode, allocate=files.zeros if files else None)
        self.overlap = None
        if (s.overlap_update and o.clip_grad == 0 and self.tables
                and all(t.on_host for t in self.tables.values())
                and (parallel.dp_size == 1 or self.vocab_sharded)):
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
            self._refresh_bytes += (self.cache.refresh_all() if rows is None
                                    else self.cache.refresh(rows))

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
            sync_replicated_row_grads(table.grad_accumulator, self.parallel.dp_group,
                                      table.weight.shape[1], self.parallel.device)

    def sync_tied_embedding_grads(self) -> None:
        """Sum the tied embedding's gradients over the first stage (from the lookup) and the
        last (from the head), after the data-parallel reduction: both then take the same step."""
        for param in self.tied_embedding:
            dist.all_reduce(param.grad, group=self.parallel.embedding_group)

    def grad_norm(self) -> float:
        """L2 norm over every dense gradient and every table's combined row gradient, over the
        whole model: TP-sharded gradients summed across ranks, TP-duplicated ones and the tied
        embedding's copy counted once."""
        counted = [p for p in self.dense_params if p.grad is not None and not is_tied_copy(p)]
        sharded = [p.grad for p in counted if get_tp_shard(p)]
        duplicated = [p.grad for p in counted if not get_tp_shard(p)]
        device = self.parallel.device
        squared = torch.zeros((), dtype=torch.float32, device=device)
        if sharded:
            squared += torch.nn.utils.get_total_norm(sharded).float() ** 2
        if duplicated and self.parallel.tp_rank == 0:
            squared += torch.nn.utils.get_total_norm(duplicated).float() ** 2
        tables = torch.zeros((), dtype=torch.float32, device=device)
        for table in self.tables.values():  # column slices: sharded like the gate
            if not table.grad_accumulator.is_empty:
                tables += table.grad_accumulator.squared_norm().float()
        if self.vocab_sharded:  # each DP rank holds the gradient of its own rows
            dist.all_reduce(tables, group=self.parallel.dp_group)
        squared += tables
        if self.parallel.tp_size * self.parallel.pp_size > 1:
            dist.all_reduce(squared, group=self.parallel.model_parallel_group)
        return math.sqrt(squared.item())

    def step(self, lr_factor: float) -> dict[str, float]:
        """Sync table rows over DP, clip, then update dense parameters and touched table rows.
        Returns metrics."""
        self.sync_table_grads()
        unique_rows = self.unique_rows()
        norm = self.grad_norm()
        if not math.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm}: training diverged "
                                     f"(lower optim.lr or check the data)")
        if self.clip_grad > 0 and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1e-6)
            torch.nn.utils.clip_grads_with_norm_(self.dense_params, self.clip_grad,
                                                 torch.tensor(norm))
            for table in self.tables.values():
                table.grad_accumulator.scale_(scale)
        for group in self.dense.param_groups:
            group["lr"] = self.base_lr * lr_factor
        self.dense.step()
        grads = {name: t.grad_accumulator.reduce() for name, t in self.tables.items()
                 if not t.grad_accumulator.is_empty}
        # Host tables: the sparse optimizer moves the row gradients (ids and rows) to host.
        bytes_d2h = sum(ids.numel() * ids.element_size() + grad.numel() * grad.element_size()
                        for name, (ids, grad) in grads.items() if self.tables[name].on_host)
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
        return {"optim/grad_norm": norm, "optim/lr": self.base_lr * lr_factor,
                "optim/table_lr": self.table_lr * lr_factor, "stem/unique_rows": unique_rows,
                "stem/bytes_d2h": float(bytes_d2h), "stem/sparse_optim_ms": sparse_ms,
                "stem/overlapped_tables": float(overlapped),
                "stem/cache_refresh_bytes": float(refresh_bytes)}

