"""stem_lookup and RowGradAccumulator against the dense gradient of F.embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stem_megatron.stem.lookup import RowGradAccumulator, stem_lookup

V, D = 50, 8


def _table(seed: int = 0) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(V, D, generator=g))


def _dense_grad(table: torch.Tensor, ids: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """The [V, D] gradient that F.embedding gives for loss = sum(out * upstream)."""
    ref = table.detach().clone().requires_grad_(True)
    (F.embedding(ids, ref) * upstream).sum().backward()
    return ref.grad


def _sparse_to_dense(ids: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    dense = torch.zeros(V, D, dtype=grad.dtype)
    dense[ids] = grad
    return dense


def test_forward_equals_indexing() -> None:
    table = _table()
    ids = torch.tensor([[3, 7, 3, 0], [49, 7, 7, 12]])
    out = stem_lookup(table, ids, RowGradAccumulator())
    assert out.shape == (2, 4, D)
    assert torch.equal(out, table.detach()[ids])


def test_backward_holds_unique_rows_with_dense_gradient() -> None:
    table = _table()
    ids = torch.tensor([[3, 7, 3, 0, 3], [49, 7, 7, 12, 0]])
    upstream = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    acc = RowGradAccumulator()
    (stem_lookup(table, ids, acc) * upstream).sum().backward()

    assert table.grad is None
    got_ids, got_grad = acc.reduce()
    assert got_ids.tolist() == [0, 3, 7, 12, 49]
    assert got_grad.dtype == torch.float32
    dense = _dense_grad(table, ids, upstream)
    torch.testing.assert_close(got_grad, dense[got_ids], rtol=1e-6, atol=1e-6)
    # Every row the sparse gradient omits is zero in the dense one.
    torch.testing.assert_close(_sparse_to_dense(got_ids, got_grad), dense, rtol=1e-6, atol=1e-6)
    assert dense.abs().sum() > 0
    assert acc.num_rows == 5
    # Row 3 appears three times: its gradient is the sum of three upstream vectors.
    torch.testing.assert_close(got_grad[1], upstream[0, 0] + upstream[0, 2] + upstream[0, 4])


def test_three_micro_batches_sum_like_dense() -> None:
    table = _table()
    gen = torch.Generator().manual_seed(2)
    acc = RowGradAccumulator()
    dense_sum = torch.zeros(V, D)
    batches = [
        torch.tensor([1, 2, 3, 3, 10]),
        torch.tensor([3, 4, 10, 10]),
        torch.tensor([[2, 40], [41, 1]]),
    ]
    for ids in batches:
        upstream = torch.randn(*ids.shape, D, generator=gen)
        (stem_lookup(table, ids, acc) * upstream).sum().backward()
        dense_sum += _dense_grad(table, ids, upstream)
    assert table.grad is None
    ids, grad = acc.reduce()
    assert ids.tolist() == [1, 2, 3, 4, 10, 40, 41]
    torch.testing.assert_close(_sparse_to_dense(ids, grad), dense_sum, rtol=1e-6, atol=1e-6)
    # reduce() is cached until the next add.
    assert acc.reduce()[1] is grad
    assert acc.num_rows == 7


def test_reduce_after_more_adds_and_clear() -> None:
    acc = RowGradAccumulator(dim=2)
    assert acc.is_empty and acc.num_rows == 0
    assert acc.reduce()[1].shape == (0, 2)
    assert acc.squared_norm().item() == 0.0
    acc.add(torch.tensor([5, 1]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    ids, grad = acc.reduce()
    assert ids.tolist() == [1, 5]
    assert grad.tolist() == [[3.0, 4.0], [1.0, 2.0]]
    acc.add(torch.tensor([1, 7]), torch.tensor([[10.0, 10.0], [0.5, 0.5]]))
    ids, grad = acc.reduce()
    assert ids.tolist() == [1, 5, 7]
    assert grad.tolist() == [[13.0, 14.0], [1.0, 2.0], [0.5, 0.5]]
    acc.clear()
    assert acc.is_empty and acc.num_rows == 0
    with pytest.raises(ValueError, match="width"):
        acc.add(torch.tensor([0]), torch.ones(1, 3))


def test_bf16_autocast() -> None:
    table = _table()
    w_gate = torch.nn.Linear(4, D, bias=False)
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[1, 1, 2, 9, 9, 9], [0, 2, 2, 5, 1, 0]])
    acc = RowGradAccumulator()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = stem_lookup(table, ids, acc)
        gate = F.silu(w_gate(x))
        h = gate * rows
    assert rows.dtype == torch.float32 and gate.dtype == torch.bfloat16
    h.float().sum().backward()
    assert table.grad is None
    got_ids, got_grad = acc.reduce()
    assert got_ids.tolist() == [0, 1, 2, 5, 9]
    assert got_grad.dtype == torch.float32
    # d(sum(gate * U[ids]))/dU[row] = sum of the gate activations at that row's positions.
    dense = _dense_grad(table, ids, gate.detach().float())
    torch.testing.assert_close(got_grad, dense[got_ids], rtol=1e-5, atol=1e-5)


def test_bf16_table_accumulates_fp32() -> None:
    table = torch.nn.Parameter(_table().detach().bfloat16())
    ids = torch.tensor([4, 4, 4, 8])
    acc = RowGradAccumulator()
    out = stem_lookup(table, ids, acc)
    assert out.dtype == torch.bfloat16
    upstream = torch.full((4, D), 1.0 + 2**-7, dtype=torch.bfloat16)
    (out * upstream).sum().backward()
    _, grad = acc.reduce()
    assert grad.dtype == torch.float32
    # 3 * (1 + 2^-7) is exact in fp32 but not representable in bf16.
    assert grad[0, 0].item() == 3 * (1 + 2**-7)


def test_squared_norm_and_scale() -> None:
    table = _table()
    gen = torch.Generator().manual_seed(4)
    acc = RowGradAccumulator()
    dense_sum = torch.zeros(V, D)
    for ids in (torch.tensor([0, 1, 1, 30]), torch.tensor([30, 31, 0])):
        upstream = torch.randn(*ids.shape, D, generator=gen)
        (stem_lookup(table, ids, acc) * upstream).sum().backward()
        dense_sum += _dense_grad(table, ids, upstream)
    norm2 = acc.squared_norm()
    assert norm2.dtype == torch.float32 and norm2.dim() == 0
    torch.testing.assert_close(norm2, dense_sum.pow(2).sum(), rtol=1e-6, atol=0)
    acc.scale_(0.25)
    acc.scale_(torch.tensor(2.0))
    ids, grad = acc.reduce()
    torch.testing.assert_close(_sparse_to_dense(ids, grad), dense_sum * 0.5, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc.squared_norm(), dense_sum.pow(2).sum() * 0.25, rtol=1e-6, atol=0)
    # A later add joins the scaled rows (the cache must be dropped).
    acc.add(torch.tensor([1]), torch.ones(1, D))
    torch.testing.assert_close(acc.reduce()[1][1], dense_sum[1] * 0.5 + 1)


def test_rejects_float_ids() -> None:
    with pytest.raises(TypeError, match="ids"):
        stem_lookup(_table(), torch.tensor([1.0]), RowGradAccumulator())


def test_accumulator_sums_bf16_chunks_in_fp32() -> None:
    acc = RowGradAccumulator()
    chunk = torch.full((1, 2), 1.0 + 2**-7, dtype=torch.bfloat16)
    for _ in range(3):
        acc.add(torch.tensor([0]), chunk.clone())
    _, grad = acc.reduce()
    assert grad.dtype == torch.float32
    assert grad[0, 0].item() == 3 * (1 + 2**-7)


def test_many_micro_batches_hold_a_bounded_number_of_rows() -> None:
    """64 micro-batches of 256 random ids into a 1000-row table: merging on the way keeps the
    held rows within 3x the table (one chunk per micro-batch would hold 16k rows), and the
    result equals summing everything at once."""
    gen = torch.Generator().manual_seed(0)
    acc = RowGradAccumulator()
    everything = torch.zeros(1000, 8, dtype=torch.float64)
    most_held = 0
    for _ in range(64):
        ids = torch.randint(0, 1000, (256,), generator=gen).unique()
        rows = torch.randn(ids.numel(), 8, generator=gen)
        acc.add(ids, rows)
        everything.index_add_(0, ids, rows.double())
        most_held = max(most_held, acc.held_rows)
    ids, grad = acc.reduce()
    assert most_held <= 3 * 1000
    assert ids.tolist() == everything.abs().sum(1).nonzero().flatten().tolist()
    torch.testing.assert_close(grad.double(), everything[ids], rtol=1e-5, atol=1e-5)
