"""The data-parallel STEM row exchanges on two gloo processes (on the CPU, or both on one GPU),
against dense gradients computed in one process, with no optimizer in between (an optimizer
such as Adam divides a gradient by its own size, so a sum-instead-of-mean shows through it only
faintly):
  - the replicated layout's row sync (stem/sync.py): every rank ends with the union of touched
    rows, each row the mean of the ranks' gradients;
  - the vocab-sharded lookup (stem/vocab_sharded.py): every rank reads exactly the full
    table's rows for its ids, and each owner receives the mean over ranks of the gradient of
    the rows it owns.

Gradients are compared to fp32 rounding (sums of at most 4 terms of size ~1: rtol 1e-6)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.sharding import RowBlock
from stem_megatron.stem.lookup import RowGradAccumulator
from stem_megatron.stem.sync import sync_replicated_row_grads
from stem_megatron.stem.vocab_sharded import vocab_sharded_lookup
from tests.devices import on_cuda

WORLD, V, D = 2, 50, 4
MICRO_BATCHES = 2
TOL = {"rtol": 1e-6, "atol": 1e-7}


def _table() -> torch.Tensor:
    return torch.randn(V, D, generator=torch.Generator().manual_seed(0))


def _micro_batch(rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [3, 7] and the gradient each token's row receives, different on every rank
    (rank 1 reads only the upper rows, so rank 0 touches rows rank 1 does not)."""
    gen = torch.Generator().manual_seed(100 * rank + micro)
    ids = torch.randint(V // 2 * rank, V, (3, 7), generator=gen)
    return ids, torch.randn(3, 7, D, generator=gen)


def _dense_mean_grad() -> torch.Tensor:
    """The whole table's gradient, averaged over ranks, as DDP averages dense gradients."""
    grad = torch.zeros(V, D)
    for rank in range(WORLD):
        for micro in range(MICRO_BATCHES):
            ids, out_grad = _micro_batch(rank, micro)
            grad.index_add_(0, ids.reshape(-1), out_grad.reshape(-1, D))
    return grad / WORLD


def _touched() -> torch.Tensor:
    return torch.unique(
        torch.cat(
            [_micro_batch(r, m)[0].reshape(-1) for r in range(WORLD) for m in range(MICRO_BATCHES)]
        )
    )


def _replicated(rank: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    accumulator = RowGradAccumulator()
    for micro in range(MICRO_BATCHES):  # what stem_lookup's backward adds per micro-batch
        ids, out_grad = _micro_batch(rank, micro)
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        rows = torch.zeros(unique.numel(), D).index_add_(0, inverse, out_grad.reshape(-1, D))
        accumulator.add(unique.to(device), rows.to(device))
    local_ids = accumulator.reduce()[0].clone()
    union = sync_replicated_row_grads(accumulator, dist.group.WORLD, D, torch.device(device))
    ids, grad = accumulator.reduce()
    assert union == ids.numel()
    return local_ids.cpu(), ids.cpu(), grad.cpu()


def test_replicated_row_sync_averages_over_the_union_of_rows(results):
    expected, touched = _dense_mean_grad(), _touched()
    per_rank = [r["replicated"] for r in results]
    assert not torch.equal(per_rank[0][0], per_rank[1][0])  # the ranks touched different rows
    for rank, (_, ids, grad) in enumerate(per_rank):
        assert torch.equal(ids, touched), rank
        torch.testing.assert_close(grad, expected[touched], **TOL)


def _vocab_sharded(rank: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    block = RowBlock.of(V, rank, WORLD)
    table = torch.nn.Parameter(_table()[block.start : block.end].clone().to(device))
    accumulator = RowGradAccumulator()
    rows_read = []
    for micro in range(MICRO_BATCHES):
        ids, out_grad = _micro_batch(rank, micro)
        out = vocab_sharded_lookup(table, ids.to(device), block, dist.group.WORLD, accumulator)
        rows_read.append(out.detach().cpu())
        out.backward(out_grad.to(device))
    ids, grad = accumulator.reduce()
    return torch.stack(rows_read), ids.cpu() + block.start, grad.cpu()


def _worker(device: str) -> dict[str, tuple[torch.Tensor, ...]]:
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        return {
            "replicated": _replicated(rank, device),
            "vocab_sharded": _vocab_sharded(rank, device),
        }
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=["cpu", on_cuda()])
def results(request) -> list[dict[str, tuple[torch.Tensor, ...]]]:
    """Each rank's results of both layouts (one start of the two processes). The cuda case:
    both processes on the one GPU (cuda:0), joined by gloo, since NCCL cannot share a device."""
    return run_local_workers(WORLD, _worker, request.param)


def test_vocab_sharded_lookup_reads_the_full_table_and_owners_get_mean_gradients(results):
    table, expected, touched = _table(), _dense_mean_grad(), _touched()
    for rank, (rows_read, ids, grad) in enumerate(r["vocab_sharded"] for r in results):
        for micro in range(MICRO_BATCHES):
            assert torch.equal(rows_read[micro], table[_micro_batch(rank, micro)[0]]), rank
        block = RowBlock.of(V, rank, WORLD)
        owned = touched[(touched >= block.start) & (touched < block.end)]
        assert owned.numel() > 0 and torch.equal(ids, owned), rank
        torch.testing.assert_close(grad, expected[owned], **TOL)
