"""Hot-row cache of host-resident STEM tables: the most frequent rows kept on the compute device.

Token frequencies are Zipfian, so a few thousand rows serve most lookups. The hot set is
chosen once, statically, from the token counts of the whole training set (one numpy bincount
over its memmap at start-up): the stream samples that data, and the counts are the same on
every rank (no communication; replicated tables stay identical). Counting only the first
batches would see a few thousand sequences and miss rows that are hot over the run.

The host table stays the master copy: the sparse optimizer updates host rows as before, and the
cache copies host -> device every cached row the optimizer wrote (its update, exact mode's
settling, a checkpoint's settle or load). So the device copy is always bitwise the host row,
and training with the cache equals training without it. What the cache saves: a hot row used by
several micro-batches of a step (and by evaluation) is copied once per update instead of once
per micro-batch. Making the cached rows the master would save the refresh too, but needs the
row update on the compute device, whose kernel differs from the host's by ulps.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

_COUNT_BLOCK = 1 << 24  # tokens per bincount: bounded memory (8 bytes a token) on any dataset


def token_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each id occurs in `tokens` (a memmap of any size), as int64 [vocab_size]."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, tokens.shape[0], _COUNT_BLOCK):
        block = np.bincount(tokens[start : start + _COUNT_BLOCK], minlength=vocab_size)
        counts += block[:vocab_size]
    return counts


def hot_ids(counts: np.ndarray, rows: int) -> torch.Tensor:
    """The `rows` most frequent ids, sorted by id (ties broken by the lower id, stably)."""
    order = np.argsort(-counts, kind="stable")[:rows]
    return torch.from_numpy(np.sort(order)).long()


class HotRowCache:
    """Device copies of rows `ids` of each host table (name -> host Parameter [V, d])."""

    def __init__(self, tables: Mapping[str, torch.Tensor], ids: torch.Tensor, device: torch.device):
        self.tables = dict(tables)
        self.ids = ids
        self.device = device
        vocab = next(iter(self.tables.values())).shape[0]
        self.slot_of = torch.full((vocab,), -1, dtype=torch.long)  # id -> cache row, -1: not cached
        self.slot_of[ids] = torch.arange(ids.numel())
        # A device copy too, so only the uncached rows' positions need copying per lookup.
        self.slot_of_device = self.slot_of.to(device)
        self.rows = {
            name: torch.empty(ids.numel(), t.shape[1], dtype=t.dtype, device=device)
            for name, t in self.tables.items()
        }
        self.refresh_all()

    @property
    def num_rows(self) -> int:
        return self.ids.numel()

    def uncached(self, unique: torch.Tensor) -> torch.Tensor:
        """Positions, in sorted unique host ids, of the ids the cache does not hold."""
        return (self.slot_of[unique] < 0).nonzero().squeeze(1)

    def assemble(
        self, name: str, unique: torch.Tensor, staged_pos: torch.Tensor, staged: torch.Tensor
    ) -> torch.Tensor:
        """Rows of `unique` (device ids) in order: from the cache, except at `staged_pos`,
        where they come from `staged` (the staging buffer's rows of the uncached ids). A new
        tensor, so the staging buffer may be reused once this returns."""
        # Uncached ids read cache row 0 first (no host sync to split the ids) and are overwritten.
        slots = self.slot_of_device.index_select(0, unique).clamp_(min=0)
        return self.rows[name].index_select(0, slots).index_copy_(0, staged_pos, staged)

    @torch.no_grad()
    def refresh(self, rows: Mapping[str, torch.Tensor]) -> int:
        """Copy host -> device the cached rows among `rows` ({table: ids the host side just
        wrote}); returns the bytes copied."""
        moved = 0
        for name, ids in rows.items():
            if name not in self.rows or ids.numel() == 0:
                continue
            slots = self.slot_of[ids.cpu()]
            cached = slots >= 0
            slots, ids = slots[cached], ids.cpu()[cached]
            if slots.numel() == 0:
                continue
            values = self.tables[name].detach().index_select(0, ids)
            self.rows[name].index_copy_(0, slots.to(self.device), values.to(self.device))
            moved += values.numel() * values.element_size() + slots.numel() * slots.element_size()
        return moved

    def refresh_all(self) -> int:
        """Copy every cached row again (after a checkpoint settled or replaced the host tables)."""
        return self.refresh(dict.fromkeys(self.tables, self.ids))
