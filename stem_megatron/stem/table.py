"""A STEM table: the per-layer [vocab, d_ff] matrix that replaces the FFN up-projection.

Under tensor parallelism a rank holds the columns of its slice of the gate projection
([vocab, d_ff / TP]), so the lookup is local and STEM adds no communication. The table is a
Parameter (it counts, it is saved) but never has a dense `.grad`: its gradient is the
row-sparse one collected by `RowGradAccumulator` and applied by the sparse optimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from stem_megatron.sharding import RowBlock, TPShard, set_row_block, set_tp_shard
from stem_megatron.stem.lookup import RowGradAccumulator, staged_lookup, stem_lookup
from stem_megatron.stem.prefetch import RowPrefetcher, StagedRows, stage_now
from stem_megatron.stem.storage import MmapFiles, to_host
from stem_megatron.stem.vocab_sharded import vocab_sharded_lookup


def xavier_normal_std(vocab_size: int, ffn_hidden_size: int) -> float:
    """The paper's init: xavier-normal over the full [V, d_ff] table."""
    return math.sqrt(2.0 / (vocab_size + ffn_hidden_size))


class StemTable(torch.nn.Module):
    """`row_block`: under the `vocab_sharded` DP layout, the rows this DP rank owns (the
    lookup then gathers other rows from their owners over `dp_group`, set by the trainer);
    None: the whole table (the `replicated` layout).

    Storage (stem/storage.py): on the compute device, or after `move_to_host` in host memory
    (or a memory-mapped file), where lookups read rows staged on the compute device by the
    trainer's `RowPrefetcher`."""

    def __init__(
        self,
        vocab_size: int,
        ffn_hidden_size: int,
        tp_size: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        row_block: RowBlock | None = None,
    ):
        super().__init__()
        if ffn_hidden_size % tp_size:
            raise ValueError(
                f"ffn_hidden_size ({ffn_hidden_size}) is not divisible by "
                f"tensor_model_parallel_size ({tp_size})"
            )
        self.vocab_size = vocab_size
        self.ffn_hidden_size = ffn_hidden_size
        rows = vocab_size if row_block is None else row_block.end - row_block.start
        self.weight = torch.nn.Parameter(
            torch.empty(rows, ffn_hidden_size // tp_size, device=device, dtype=dtype)
        )
        set_tp_shard(self.weight, TPShard(dim=1))
        set_row_block(self.weight, row_block)
        self.weight.is_stem_table = True
        self.row_block = row_block
        self.grad_accumulator = RowGradAccumulator()
        self.compute_device: torch.device | None = None  # set by move_to_host
        # Set by `connect` (stem/tables.py, the tables' owner) before the first lookup:
        self.dp_group: dist.ProcessGroup | None = None  # vocab-sharded lookups gather over it
        self.prefetcher: RowPrefetcher | None = None  # stages host rows ahead of lookups
        self.prefetch_key = ""  # this table's name in the prefetcher
        self.replay: StagedReplay | None = None  # set while a recomputed region runs

    def connect(
        self, dp_group: dist.ProcessGroup | None, prefetcher: RowPrefetcher | None, key: str
    ) -> None:
        """Wire the lookup to its DP group and, for host tables, the prefetcher that stages
        its rows under `key`."""
        self.dp_group, self.prefetcher, self.prefetch_key = dp_group, prefetcher, key

    @property
    def on_host(self) -> bool:
        return self.compute_device is not None

    def move_to_host(
        self, compute_device: torch.device | str, files: MmapFiles | None = None
    ) -> None:
        """Keep the table in host memory (in a memory-mapped file of `files`, the `mmap`
        tier, when given); lookups return rows on `compute_device`. Moving the model to a
        device afterwards leaves the table where it is (`_apply`), so a model can be built
        on the CPU, its tables placed on the host, and the rest moved to the GPU without the
        tables ever passing through device memory."""
        self.compute_device = torch.device(compute_device)
        host = to_host(self.weight.data) if files is None else files.copy(self.weight.data)
        self.weight.data = host

    def _apply(self, fn, recurse=True):
        if not self.on_host:
            return super()._apply(fn, recurse)
        weight = self._parameters.pop("weight")
        try:
            return super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table for `token_ids` (any shape), shape token_ids.shape + (d_ff/TP,)."""
        if not self.on_host:
            return self._lookup(token_ids, None)
        if self.prefetcher is not None and self.prefetcher.active:
            if self.replay is not None and self in self.replay:  # a recompute: no second slot
                return self._lookup(token_ids, self.replay.pop(self))
            with self.prefetcher.staged(self.prefetch_key, token_ids.numel()) as staged:
                if self.replay is not None:
                    self.replay.keep(self, staged)
                return self._lookup(token_ids, staged)
        if self.row_block is None:  # a lookup outside a prefetched step (e.g. generation)
            return self._lookup(
                token_ids, stage_now(self.weight.detach(), token_ids, self.compute_device)
            )
        return self._lookup(token_ids, None)

    def _lookup(self, token_ids: torch.Tensor, staged: StagedRows | None) -> torch.Tensor:
        """`staged`: rows already on the compute device (all the micro-batch's rows, or under
        the vocab-sharded layout this rank's share of them, with their plan)."""
        if self.row_block is not None:
            plan, rows = (None, None) if staged is None else (staged.plan, staged.rows)
            return vocab_sharded_lookup(
                self.weight,
                token_ids,
                self.row_block,
                self.dp_group,
                self.grad_accumulator,
                plan,
                rows,
            )
        if staged is None:
            return stem_lookup(self.weight, token_ids, self.grad_accumulator)
        return staged_lookup(
            self.weight, token_ids, staged.unique_ids, staged.rows, self.grad_accumulator
        )

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, local_shape={tuple(self.weight.shape)}"


class StagedReplay:
    """The staged rows of the host-table lookups of one recomputed region (model/recompute.py).

    The region's forward runs twice, without autograd and again in the backward, but the
    prefetcher stages one slot per table and micro-batch, and a slot is reused as soon as its
    lookup returns. So the first run keeps a copy of each table's staged rows (its unique
    rows, at most one per token) and the recompute looks up from that copy instead of taking
    the next micro-batch's slot. Row gradients come from the recompute's backward only (the
    first run records no graph), so each table still adds once per micro-batch."""

    def __init__(self) -> None:
        self._rows: dict[int, StagedRows] = {}

    def __contains__(self, table: StemTable) -> bool:
        return id(table) in self._rows

    def keep(self, table: StemTable, staged: StagedRows) -> None:
        self._rows[id(table)] = dataclasses.replace(staged, rows=staged.rows.clone())

    def pop(self, table: StemTable) -> StagedRows:
        return self._rows.pop(id(table))

    @contextlib.contextmanager
    def attached(self, tables: list[StemTable]) -> Iterator[None]:
        for table in tables:
            table.replay = self
        try:
            yield
        finally:
            for table in tables:
                table.replay = None


def is_stem_table(param: torch.Tensor) -> bool:
    return getattr(param, "is_stem_table", False)
