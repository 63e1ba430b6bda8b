"""Memory of one rank's STEM tables, per tier: what the code allocates for them.

Rows held (`stem.dp_layout`): `replicated`: every DP rank holds all `vocab` rows of each
table; `vocab_sharded`: DP rank r holds its RowBlock (sharding.py) only, and the
optimizer state of those rows. The dry run builds the tables with their real row count, so the
shapes handed in here are already per rank.

Where they live (`stem.storage`, stem/storage.py): `device`: table, exp_avg and exp_avg_sq
(fp32) and exact mode's int64 settled step per row on the compute device. `host`: all of it in
(pinned) host RAM. `mmap`: table and moments in memory-mapped files on disk, the settled steps
in host RAM (training/model_chunks.py). Off-device tables add on the device the prefetch's
staging buffers (stem/prefetch.py: two slots per table, grown to a multiple of 256 rows of the
largest micro-batch's uncached rows; each has a host twin) and the hot-row cache
(stem/cache.py: `stem.cache_rows` rows per table plus an int64 id -> slot map on device and
on host).

Row gradients (stem/lookup.py, stem/sync.py, stem/vocab_sharded.py) depend on the data; the
estimate takes the worst case, every id of a micro-batch distinct (bounded by the rows that
exist). With t ids per micro-batch, n micro-batches per step, V rows and DP d:
  accumulating: each backward adds a chunk of c rows; the accumulator merges (concatenates and
  sums) once the held rows pass twice the rows of its last merge (or of a chunk), so with R
  rows in the step's final gradient it holds min(n c, 2 max(R, c)) rows, and a merge briefly
  needs the rows concatenated plus R more.
  replicated: chunks of c = min(V, t) rows summing into R = min(V, n t); with d > 1 the sync
  then keeps a union buffer of min(V, d n t) rows per table. Held per table: the larger of the
  accumulated rows and the union buffer; the table being reduced or synced needs its peak on
  top of that.
  vocab_sharded: a lookup's union holds u = min(V, d t) rows; the forward's all-gather and the
  backward's reduce-scatter each use d x s rows with s = min(block, u) (the longest owner's
  segment) next to the union (u) and the local rows (min(V, t)), one table at a time; each
  backward adds a chunk of this rank's own rows of the union, c = min(own rows, u).
Off-device tables are updated on the host: each table's reduced gradient is copied there for
its update, one table at a time. Index tensors (8 bytes a row) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from stem_megatron.sharding import RowBlock

FP32 = 4
INT64 = 8
STAGING_SLOTS = 2  # stem/prefetch.py: double buffering
STAGING_GROW_ROWS = 256  # stem/prefetch.py: slots grow in multiples of this


@dataclass(frozen=True)
class TableSetup:
    """What shapes a rank's STEM table memory besides the table shapes."""

    vocab: int
    dp_size: int
    vocab_sharded: bool  # dp_layout=vocab_sharded with DP > 1 (rows split over DP ranks)
    storage: str  # device | host | mmap
    exact: bool  # optimizer mode `exact`: an int64 settled step per row
    cache_rows: int
    ids_per_microbatch: int  # ids one micro-batch's lookup reads on one rank (b x s)
    num_microbatches: int


@dataclass(frozen=True)
class TableMemory:
    """Bytes of one rank's STEM tables and their buffers; `storage` says where the weights
    and moments are."""

    storage: str
    weights: int
    optimizer: int  # exp_avg + exp_avg_sq
    step_counters: int  # exact mode's settled step per row (device tier: device; else host)
    row_grads: int  # held across the step, all tables (device)
    grad_transient: int  # on top, while one table is exchanged or reduced (device)
    staging_device: int
    staging_host: int
    cache_device: int
    cache_host: int
    update_copy_host: int  # one table's reduced gradient, copied for the host update

    @property
    def device(self) -> int:
        resident = (
            self.weights + self.optimizer + self.step_counters if self.storage == "device" else 0
        )
        return (
            resident
            + self.row_grads
            + self.grad_transient
            + self.staging_device
            + self.cache_device
        )

    @property
    def host(self) -> int:
        resident = {
            "device": 0,
            "host": self.weights + self.optimizer + self.step_counters,
            "mmap": self.step_counters,
        }[self.storage]
        return resident + self.staging_host + self.cache_host + self.update_copy_host

    @property
    def mmap(self) -> int:
        return self.weights + self.optimizer if self.storage == "mmap" else 0


@dataclass(frozen=True)
class _GradRows:
    held: int  # rows kept until the step's update
    peak_extra: int  # rows on top of `held` while this table is exchanged or reduced
    reduced: int  # rows of the final gradient the update reads


def _accumulated(n: int, chunk: int, reduced: int) -> tuple[int, int]:
    """(rows held, rows a merge adds on top) of stem/lookup.py's RowGradAccumulator over `n`
    chunks of `chunk` rows that sum into `reduced` rows."""
    held = min(n * chunk, 2 * max(reduced, chunk))
    merge = min(n * chunk, held + chunk) + reduced if n > 1 else 0
    return held, merge


def _grad_rows(rows: int, s: TableSetup) -> _GradRows:
    """Row-gradient buffer rows of one table holding `rows` rows (see the module docstring)."""
    n, d, t, vocab = s.num_microbatches, s.dp_size, s.ids_per_microbatch, s.vocab
    local = min(vocab, t)  # distinct ids of one micro-batch on this rank
    if s.vocab_sharded:
        union = min(vocab, d * t)
        segment = min(RowBlock.of(vocab, 0, d).end, union)  # block 0 is the longest
        chunk = min(rows, union)
        reduced = min(rows, n * chunk)
        held, merge = _accumulated(n, chunk, reduced)
        exchange = local + union + d * segment + segment
        return _GradRows(held, max(exchange, merge), reduced)
    reduced = min(vocab, n * t)
    held, merge = _accumulated(n, local, reduced)
    if d == 1:
        return _GradRows(held, merge, reduced)
    union = min(vocab, d * n * t)
    return _GradRows(max(held, union), max(held + merge, reduced + union) - max(held, union), union)


def _staged_rows(rows: int, s: TableSetup) -> int:
    """Rows of each staging slot of an off-device table after the worst micro-batch."""
    cached = min(s.cache_rows, rows)
    wanted = (
        min(rows, s.dp_size * s.ids_per_microbatch)
        if s.vocab_sharded
        else min(rows, s.ids_per_microbatch)
    )
    uncached = min(wanted, rows - cached)
    return -(-max(uncached, 1) // STAGING_GROW_ROWS) * STAGING_GROW_ROWS


def table_memory(shapes: tuple[tuple[int, int], ...], s: TableSetup) -> TableMemory:
    """Memory of the tables of local shapes `shapes` ([rows, columns] each) on one rank."""
    weights = sum(r * c for r, c in shapes) * FP32
    counters = sum(r for r, _ in shapes) * INT64 if s.exact else 0
    grads = [(_grad_rows(r, s), c) for r, c in shapes]
    off_device = s.storage != "device" and bool(shapes)
    staging = (
        sum(STAGING_SLOTS * _staged_rows(r, s) * c * FP32 for r, c in shapes) if off_device else 0
    )
    cache = sum(min(s.cache_rows, r) * c for r, c in shapes) * FP32 if off_device else 0
    # One id -> slot map of the table's rows, on device and on host (HotRowCache.slot_of).
    slot_map = shapes[0][0] * INT64 if off_device and s.cache_rows else 0
    return TableMemory(
        storage=s.storage,
        weights=weights,
        optimizer=2 * weights,
        step_counters=counters,
        row_grads=sum(g.held * c for g, c in grads) * FP32,
        grad_transient=max((g.peak_extra * c for g, c in grads), default=0) * FP32,
        staging_device=staging,
        staging_host=staging,
        cache_device=cache + slot_map,
        cache_host=slot_map,
        update_copy_host=(
            max((g.reduced * c for g, c in grads), default=0) * FP32 if off_device else 0
        ),
    )
