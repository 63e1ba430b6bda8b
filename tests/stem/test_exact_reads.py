"""Exact mode along a training run: a step's gradient depends on the rows it reads, so rows
must be settled before they are read (SparseRowAdamW.settle_rows); then the whole run matches
dense torch.optim.AdamW over the table, not just each update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stem_megatron.stem.sparse_adam import SparseRowAdamW

V, D, STEPS = 300, 16, 120


def lr_at(step: int) -> float:  # warmup then cosine
    warm = 10
    if step < warm:
        return 1e-2 * (step + 1) / warm
    return 1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + np.cos(np.pi * (step - warm) / (STEPS - warm)))


def run(settle_before_read: bool, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(V, D, generator=gen) * 0.1
    target = torch.randn(V, D, generator=gen)
    rng = np.random.default_rng(0)
    sparse_table = torch.nn.Parameter(init.clone())
    sparse = SparseRowAdamW(
        {"t": sparse_table},
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.1,
        mode="exact",
        kernel=kernel,
    )
    dense_table = torch.nn.Parameter(init.clone())
    dense = torch.optim.AdamW(
        [dense_table], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1
    )
    for step in range(STEPS):
        ids = torch.from_numpy(np.minimum(rng.zipf(1.3, size=64) - 1, V - 1))
        rows = torch.unique(ids)
        if settle_before_read:
            sparse.settle_rows({"t": rows})
        # loss = sum over read tokens of |row - target|^2: the gradient depends on the row
        counts = torch.bincount(ids, minlength=V)[rows].float().unsqueeze(1)
        grad_rows = 2 * counts * (sparse_table.data[rows] - target[rows])
        sparse.step({"t": (rows, grad_rows)}, lr=lr_at(step))
        dense_grad = torch.zeros(V, D)
        dense_grad[rows] = 2 * counts * (dense_table.data[rows] - target[rows])
        dense_table.grad = dense_grad
        for group in dense.param_groups:
            group["lr"] = lr_at(step)
        dense.step()
    sparse.settle()
    return sparse_table.data, dense_table.data


@pytest.mark.parametrize("kernel", ["torch", "cpp"])
def test_settling_before_reads_matches_dense_adamw_over_a_run(kernel):
    sparse, dense = run(settle_before_read=True, kernel=kernel)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_without_settling_reads_are_stale():
    sparse, dense = run(settle_before_read=False, kernel="torch")
    assert (sparse - dense).abs().max() > 1e-4  # the fix above is needed
