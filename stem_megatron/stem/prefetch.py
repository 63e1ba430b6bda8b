"""Staging the rows of host-resident STEM tables ahead of the micro-batches that read them.

A step's micro-batches are known before the schedule runs, so their ids are too. `start`
hands the rows each micro-batch will read (`RowRequest`: its ids, or under the vocab-sharded
layout the union rows this rank owns) to a background thread that, per micro-batch, takes the
sorted unique rows,
gathers those rows of every host table into a preallocated host staging buffer and copies
them to the compute device (on GPU: on a side stream, from pinned memory). The lookup of a
host table then reads its rows from the staged buffer (`StemTable.forward`) and waits only if
the prefetch is late; that wait is the `stem/prefetch_stall_ms` metric.

Each table has two staging slots (double buffering): micro-batch i+1 is staged while i is
read, and micro-batch i+2 reuses i's slot once i's lookup has read it. Slots grow only when a
micro-batch needs more rows than they hold. Lookups are served by micro-batch index per table,
in the order each table consumes them: every model chunk of megatron's schedules (no
pipelining, 1F1B, interleaved) runs its micro-batches in order, but chunks run at different
offsets, so the thread stages whichever table's next micro-batch has a free slot.

With a hot-row cache (stem/cache.py), only the rows of a micro-batch that are not cached are
gathered and copied; the lookup gets all rows in order, the cached ones read from the cache on
the compute stream. `stem/cache_hit_rate` is the fraction of looked-up unique rows the cache
served.

Staleness: the trainer starts the prefetch of step t+1 only after step t's sparse update
returned (host tables are updated synchronously in the calling thread) and joins the thread of
step t before that update runs (`finish`), so no staged row can predate an update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from stem_megatron.stem.cache import HotRowCache
from stem_megatron.stem.storage import CopyEngine, host_empty

_SLOTS = 2  # double buffering
_GROW_ROWS = 256  # slots grow in whole multiples of this, to avoid regrowing by a few rows


@dataclass
class RowRequest:
    """The host-table rows one micro-batch's lookups will read."""

    rows: torch.Tensor  # host row indices, any shape and order (staged sorted and unique)
    num_ids: int  # ids each lookup of the micro-batch passes: checks the order of service
    plan: object = None  # handed to the lookup with the rows (vocab-sharded: its LookupPlan)

    @classmethod
    def of_ids(cls, ids: torch.Tensor) -> RowRequest:
        """A micro-batch that reads the rows of its own ids (the replicated layout)."""
        return cls(ids, ids.numel())


@dataclass
class StagedRows:
    """One table's rows for one micro-batch, on the compute device."""

    unique_ids: torch.Tensor  # sorted unique row indices of the request [n]
    rows: torch.Tensor  # table rows of `unique_ids` [n, d]
    num_ids: int  # ids in the micro-batch: a check that the right micro-batch is served
    staged_pos: torch.Tensor | None = None  # with a cache: positions of the uncached ids,
    # the only rows `rows` holds
    plan: object = None  # the request's plan


@dataclass
class _Slot:
    host: torch.Tensor | None = None
    device: torch.Tensor | None = None
    copied: object = None  # copy-engine marker of the last copy out of `host`
    released: object = None  # compute marker after the last read of `device`


def stage_now(table: torch.Tensor, ids: torch.Tensor, device: torch.device) -> StagedRows:
    """Synchronous staging, for a lookup outside a prefetched step (e.g. generation)."""
    unique = torch.unique(ids.reshape(-1), sorted=True)
    rows = table.index_select(0, unique.to(table.device)).to(device)
    return StagedRows(unique.to(device), rows, ids.numel())


class RowPrefetcher:
    """Stages rows of `tables` (name -> host tensor [V, d]) for the micro-batches of one step
    at a time: `with prefetcher.prefetching(requests): <run the schedule>` (one RowRequest
    per micro-batch), then
    `prefetcher.finish()` (joins the thread, checks every lookup happened, returns metrics).
    `cache`: hot rows of the same tables kept on `device`, not staged."""

    def __init__(
        self,
        tables: Mapping[str, torch.Tensor],
        device: torch.device,
        cache: HotRowCache | None = None,
    ):
        self.tables = dict(tables)
        self.cache = cache
        self.engine = CopyEngine(device)
        self.device = device
        self._slots = {name: [_Slot() for _ in range(_SLOTS)] for name in self.tables}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._requests: list[RowRequest] = []
        self._ready: dict[tuple[str, int], tuple[StagedRows, _Slot]] = {}
        self._served = dict.fromkeys(self.tables, 0)
        self._error: BaseException | None = None
        self._abort = False
        self.bytes_h2d = 0
        self.stall_s = 0.0
        self.rows_looked_up = 0  # unique rows of every staged lookup
        self.rows_cached = 0  # of which the cache served

    @property
    def active(self) -> bool:
        return self._thread is not None

    def slot_capacity(self, name: str) -> list[int]:
        """Rows each staging slot of table `name` holds (0: not allocated yet)."""
        return [0 if s.host is None else s.host.shape[0] for s in self._slots[name]]

    # -- the step ----------------------------------------------------------------------
    def start(self, requests: list[RowRequest]) -> None:
        """Begin staging: `requests[i]` says what micro-batch i reads (host row indices).
        Every table must then be looked up once per micro-batch, in order, before `finish`."""
        if self.active:
            raise RuntimeError("RowPrefetcher.start while a step is still being prefetched")
        self._requests = list(requests)
        self._ready.clear()
        self._served = dict.fromkeys(self.tables, 0)
        self._error, self._abort = None, False
        self._thread = threading.Thread(target=self._run, name="stem-row-prefetch", daemon=True)
        self._thread.start()

    def finish(self) -> dict[str, float]:
        """Join the staging thread; check every table consumed every micro-batch; return this
        step's metrics and reset them."""
        self._join()
        short = {n: s for n, s in self._served.items() if s != len(self._requests)}
        if short:
            raise RuntimeError(
                f"host tables looked up fewer times than the "
                f"{len(self._requests)} prefetched micro-batches: {short}"
            )
        metrics = {
            "stem/bytes_h2d": float(self.bytes_h2d),
            "stem/prefetch_stall_ms": self.stall_s * 1e3,
            "stem/cache_hit_rate": self.rows_cached / max(self.rows_looked_up, 1),
        }
        self.bytes_h2d, self.stall_s = 0, 0.0
        self.rows_looked_up, self.rows_cached = 0, 0
        return metrics

    def abort(self) -> None:
        """Stop staging after a failed step (the schedule raised) without checks."""
        with self._cond:
            self._abort = True
            self._cond.notify_all()
        self._join()

    @contextlib.contextmanager
    def prefetching(self, requests: list[RowRequest]) -> Iterator[None]:
        self.start(requests)
        try:
            yield
        except BaseException:
            self.abort()
            raise

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and not self._abort:
            raise RuntimeError("staging host table rows failed") from self._error

    # -- the lookup side ---------------------------------------------------------------
    @contextlib.contextmanager
    def staged(self, name: str, num_ids: int) -> Iterator[StagedRows]:
        """Table `name`'s rows for its next micro-batch; waits (and counts the wait) until
        they are staged. Leaving the block releases the slot for reuse."""
        index = self._served[name]
        start = time.perf_counter()
        with self._cond:
            while (name, index) not in self._ready:
                if self._error is not None:
                    raise RuntimeError("staging host table rows failed") from self._error
                if index >= len(self._requests):
                    raise RuntimeError(
                        f"table {name}: lookup {index + 1} in a step of "
                        f"{len(self._requests)} prefetched micro-batches"
                    )
                self._cond.wait()
            rows, slot = self._ready.pop((name, index))
        self.stall_s += time.perf_counter() - start
        if rows.num_ids != num_ids:
            raise RuntimeError(
                f"table {name}: a lookup of {num_ids} ids, but micro-batch {index} "
                f"was staged with {rows.num_ids}: micro-batches out of order"
            )
        pos = rows.staged_pos
        self.engine.compute_waits(
            slot.copied, rows.unique_ids, rows.rows, *(() if pos is None else (pos,))
        )
        if pos is not None:
            rows = dataclasses.replace(
                rows,
                rows=self.cache.assemble(name, rows.unique_ids, pos, rows.rows),
                staged_pos=None,
            )
        yield rows
        with self._cond:
            slot.released = self.engine.compute_marker()
            self._served[name] += 1
            self._cond.notify_all()

    # -- the staging thread ------------------------------------------------------------
    def _next_task(self, pending: dict[str, int]) -> tuple[int, str] | None:
        """The earliest (micro-batch, table) whose slot is free, waiting for one; None when
        every table is staged (or on abort)."""
        n = len(self._requests)
        with self._cond:
            while not self._abort:
                todo = [(i, name) for name, i in pending.items() if i < n]
                if not todo:
                    return None
                free = [(i, name) for i, name in todo if self._served[name] > i - _SLOTS]
                if free:
                    return min(free)
                self._cond.wait()
            return None

    def _run(self) -> None:
        try:
            pending = dict.fromkeys(self.tables, 0)
            unique: dict[int, torch.Tensor] = {}
            while (task := self._next_task(pending)) is not None:
                index, name = task
                if index not in unique:
                    unique[index] = torch.unique(
                        self._requests[index].rows.reshape(-1), sorted=True
                    )
                staged = self._stage(name, index, unique[index])
                with self._cond:
                    self._ready[(name, index)] = staged
                    pending[name] += 1
                    self._cond.notify_all()
                for done in [i for i in unique if i < min(pending.values())]:
                    del unique[done]
        except BaseException as exc:  # handed to the lookup or to finish
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _stage(self, name: str, index: int, unique: torch.Tensor) -> tuple[StagedRows, _Slot]:
        # Detached at each use: reads whatever storage the table has now (a load may have
        # replaced it), and the gather into the staging buffer (out=) is not recorded by autograd.
        table, slot = self.tables[name].detach(), self._slots[name][index % _SLOTS]
        self.rows_looked_up += unique.numel()
        pos_host = None if self.cache is None else self.cache.uncached(unique)
        gather = unique if pos_host is None else unique[pos_host]
        self.rows_cached += unique.numel() - gather.numel()
        n, width = gather.numel(), table.shape[1]
        self.engine.host_waits(slot.copied)  # the previous copy out of this buffer is done
        with self.engine.context():
            if slot.host is None or slot.host.shape[0] < n:
                rows = -(-max(n, 1) // _GROW_ROWS) * _GROW_ROWS
                slot.host = host_empty(rows, width, table.dtype)
                # Allocated on the copy stream, which writes it: a block the compute stream
                # freed could still be read by queued compute (the lookups mark their reads).
                slot.device = torch.empty(rows, width, dtype=table.dtype, device=self.device)
                slot.released = None  # a new buffer: no read of it to wait for
            torch.index_select(table, 0, gather, out=slot.host[:n])
            self.engine.copy_waits(slot.released)  # the last read of the device buffer is done
            slot.device[:n].copy_(slot.host[:n], non_blocking=True)
            ids = unique.to(self.device, non_blocking=True)
            pos = None if pos_host is None else pos_host.to(self.device, non_blocking=True)
            slot.copied = self.engine.copy_marker()
        index_bytes = unique.numel() + (0 if pos_host is None else n)
        self.bytes_h2d += n * width * table.element_size() + index_bytes * unique.element_size()
        request = self._requests[index]
        return StagedRows(ids, slot.device[:n], request.num_ids, pos, request.plan), slot
