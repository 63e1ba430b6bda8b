"""Host-table updates overlapped with the rest of the backward.

A STEM table's gradient for a step is final once the step's last micro-batch has run its
backward through that layer; the layers below it still have backward work to do. When nothing
else has to come first, each host table's row update then starts on a worker thread at that
moment, while the backward goes on (on a GPU: the host update runs on CPU cores the device's
backward does not use). What has to come first, and turns this off:
  - gradient clipping (`optim.clip_grad > 0`): the global norm needs every gradient;
  - the replicated DP layout with DP > 1: the row gradients are all-reduced after the
    backward (the vocab-sharded layout reduce-scatters them inside it, so it qualifies).
Tables on the compute device are updated there after the backward, as before.

The update is the same one `SparseRowAdamW.step` makes (same gradient, same LR, same kernel),
so training is bitwise the same with and without the overlap.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor

from stem_megatron.stem.sparse_adam import SparseRowAdamW
from stem_megatron.stem.table import StemTable


class OverlappedTableUpdate:
    """`arm(lr, micro_batches)` before a step's schedule; `finish()` after it waits for the
    updates that started and returns the tables they covered."""

    def __init__(self, sparse: SparseRowAdamW, tables: dict[str, StemTable]):
        self.sparse, self.tables = sparse, tables
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="stem-table-update")
        self._futures: dict[str, Future] = {}
        self._micro_batches = 0
        self.lr = 0.0
        self.wait_s = 0.0  # the last finish's wait for updates still running

    def arm(self, lr: float, micro_batches: int) -> None:
        """Advance the table optimizer's step now (its LR is known) and start each table's
        update when its accumulator has received `micro_batches` backward passes."""
        self.lr = self.sparse.start_step(lr)
        self._futures, self._micro_batches = {}, micro_batches
        for name, table in self.tables.items():
            table.grad_accumulator.on_add = functools.partial(self._on_add, name)

    def _on_add(self, name: str, adds: int) -> None:
        if adds == self._micro_batches:  # the step's last backward through this table
            ids, grad = self.tables[name].grad_accumulator.reduce()
            self._futures[name] = self._worker.submit(
                self.sparse.update_table, name, ids, grad, self.lr
            )

    def finish(self) -> set[str]:
        """Wait for the started updates (re-raising their errors); disarm the hooks."""
        for table in self.tables.values():
            table.grad_accumulator.on_add = None
        futures, self._futures = self._futures, {}
        start = time.perf_counter()
        for future in futures.values():
            future.result()
        self.wait_s = time.perf_counter() - start
        return set(futures)
