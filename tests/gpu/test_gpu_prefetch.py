"""The row prefetcher on CUDA under stress (issue 12, defect 2): the compute stream is kept
behind (torch.cuda._sleep before each read), so every read of a staging slot is queued long
after the staging thread has moved on, while 48 micro-batches of growing size make the slots
grow again and again (the old buffers freed while queued compute still reads them). A copy that
does not wait for the last read of its slot, or a buffer whose memory is reused before the
compute stream is done with it, changes the rows a lookup read; every read is checked against
the table once the GPU is idle."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.stem.prefetch import RowPrefetcher
from tests.stem.test_prefetch import requests

pytestmark = pytest.mark.gpu
V, D = 8192, 64
MICRO_BATCHES = 48
BEHIND_CYCLES = 5_000_000  # about 2-3 ms of GPU time per read


def growing_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, V, (1, 32 * (i + 1)), generator=gen) for i in range(MICRO_BATCHES)]


def test_prefetched_rows_survive_a_compute_stream_that_lags_behind():
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    tables = {name: torch.randn(V, D, generator=gen).pin_memory() for name in ("a", "b")}
    batches = growing_batches()
    prefetcher = RowPrefetcher(tables, device)
    reads = []
    for _ in range(2):  # a second step reuses the grown slots
        with prefetcher.prefetching(requests(batches)):
            for ids in batches:
                for name in tables:
                    with prefetcher.staged(name, ids.numel()) as staged:
                        torch.cuda._sleep(BEHIND_CYCLES)
                        reads.append((name, staged.unique_ids, staged.rows * 1.0))
        metrics = prefetcher.finish()
        assert metrics["stem/bytes_h2d"] > 0
    torch.cuda.synchronize()
    assert len(reads) == 2 * MICRO_BATCHES * len(tables)
    for i, (name, unique, rows) in enumerate(reads):
        unique = unique.cpu()
        assert torch.equal(unique, torch.unique(batches[i // 2 % MICRO_BATCHES])), i
        assert torch.equal(rows.cpu(), tables[name][unique]), (i, name)
    largest = max(torch.unique(ids).numel() for ids in batches)
    assert largest > 1024 and min(prefetcher.slot_capacity("a")) >= 1024  # grown from 256
