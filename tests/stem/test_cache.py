"""HotRowCache: the hot set is the most frequent ids, the prefetcher stages only uncached rows
yet a lookup gets every row in order, and a refresh copies exactly the cached rows written."""

from __future__ import annotations

import numpy as np
import torch

from stem_megatron.stem import cache as cache_module
from stem_megatron.stem.cache import HotRowCache, hot_ids, token_counts
from stem_megatron.stem.prefetch import RowPrefetcher, RowRequest

CPU = torch.device("cpu")


def requests(batches: list[torch.Tensor]) -> list[RowRequest]:
    return [RowRequest.of_ids(ids) for ids in batches]


def test_token_counts_over_blocks_and_hot_ids(monkeypatch):
    tokens = np.array([3, 1, 3, 0, 3, 1, 5, 7, 1, 3], dtype=np.uint16)
    monkeypatch.setattr(cache_module, "_COUNT_BLOCK", 3)  # several blocks, a partial last one
    counts = token_counts(tokens, vocab_size=8)
    assert counts.tolist() == np.bincount(tokens, minlength=8).tolist()
    assert hot_ids(counts, 2).tolist() == [1, 3]
    assert hot_ids(counts, 3).tolist() == [0, 1, 3]  # ties: the lower id
    assert hot_ids(counts, 100).tolist() == list(range(8))


def test_prefetcher_stages_only_uncached_rows_and_lookups_get_all_rows():
    tables = {"a": torch.randn(40, 6), "b": torch.randn(40, 6)}
    cache = HotRowCache(tables, torch.tensor([0, 2, 5, 9]), CPU)
    batches = [
        torch.tensor([[0, 2, 3, 9], [3, 11, 0, 0]]),
        torch.tensor([[0, 2, 5, 9]]),
        torch.tensor([[7, 8, 30]]),
    ]
    prefetcher = RowPrefetcher(tables, CPU, cache)
    with prefetcher.prefetching(requests(batches)):
        for ids in batches:
            for name, table in tables.items():
                with prefetcher.staged(name, ids.numel()) as staged:
                    assert torch.equal(staged.unique_ids, torch.unique(ids))
                    assert torch.equal(staged.rows, table[torch.unique(ids)])
    metrics = prefetcher.finish()
    # Unique rows 0 2 3 9 11 | 0 2 5 9 | 7 8 30: 7 of 12 cached, per table.
    assert metrics["stem/cache_hit_rate"] == 7 / 12
    misses = 5  # each staged with its row (6 fp32), its id and its position (int64)
    assert metrics["stem/bytes_h2d"] == 2 * (misses * (6 * 4 + 8) + 12 * 8)


def test_refresh_copies_only_cached_rows_that_were_written():
    tables = {"a": torch.randn(10, 4)}
    cache = HotRowCache(tables, torch.tensor([1, 4]), CPU)
    tables["a"][[1, 4, 7]] += 1.0
    assert cache.refresh({"a": torch.tensor([4, 7])}) == 4 * 4 + 8  # row 4 only
    assert torch.equal(cache.rows["a"][1], tables["a"][4])
    assert not torch.equal(cache.rows["a"][0], tables["a"][1])  # not reported written
    assert cache.refresh_all() == 2 * (4 * 4 + 8)
    assert torch.equal(cache.rows["a"], tables["a"][[1, 4]])
