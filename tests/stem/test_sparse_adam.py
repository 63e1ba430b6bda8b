"""SparseRowAdamW against torch.optim.AdamW: lazy mode per row (and a per-row reference),
exact mode over the whole table."""

from __future__ import annotations

import math

import pytest
import torch

from stem_megatron.stem.exact_history import exact_tail_steps
from stem_megatron.stem.sparse_adam import SparseRowAdamW
from tests.devices import on_cuda

V, D = 40, 6
BETAS = (0.9, 0.999)
EPS = 1e-8
WD = 0.1


def _lr(step: int, total: int = 60, peak: float = 1e-2, warmup: int = 5) -> float:
    """Warmup + cosine: a different LR on every step."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return 1e-4 + 0.5 * (peak - 1e-4) * (1 + math.cos(math.pi * progress))


def _table(seed: int = 0, vocab: int = V, device: str = "cpu") -> torch.nn.Parameter:
    return torch.nn.Parameter(
        (torch.randn(vocab, D, generator=torch.Generator().manual_seed(seed)) * 0.05).to(device)
    )


@pytest.mark.parametrize(
    "kernel,device",
    [
        ("torch", "cpu"),
        ("torch_fused", "cpu"),
        ("cpp", "cpu"),
        on_cuda("torch"),
        on_cuda("torch_fused"),
        on_cuda("auto"),  # device tables take the fused kernel
    ],
)
def test_fixed_rows_match_torch_adamw(kernel: str, device: str) -> None:
    # cpp computes the step as AdamW(fused=True); so does auto on the GPU (torch_fused)
    fused = kernel in ("torch_fused", "cpp") or (kernel, device) == ("auto", "cuda")
    table = _table(device=device)
    start = table.detach().clone()
    rows = torch.tensor([1, 4, 5, 17, 30, 39], device=device)
    ref = torch.nn.Parameter(start[rows].clone())
    ref_opt = torch.optim.AdamW(
        [ref], lr=1.0, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False, fused=fused or None
    )
    opt = SparseRowAdamW({"u": table}, betas=BETAS, eps=EPS, weight_decay=WD, kernel=kernel)
    if kernel == "auto":
        assert opt.kernel == "torch_fused"
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 61):
        lr = _lr(step)
        grad = (torch.randn(len(rows), D, generator=gen) * 0.1).to(device)
        # Small-magnitude gradients in one row: there sqrt(v) is near eps.
        grad[2] *= 1e-6
        ref.grad = grad.clone()
        ref_opt.param_groups[0]["lr"] = lr
        ref_opt.step()
        opt.step({"u": (rows, grad)}, lr=lr)
        assert table.grad is None
    assert opt.step_count == 60
    got = table.detach()
    torch.testing.assert_close(got[rows], ref.detach(), rtol=1e-6, atol=0)
    assert not torch.equal(got[rows], start[rows])
    torch.testing.assert_close(
        opt.exp_avg["u"][rows], ref_opt.state[ref]["exp_avg"], rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        opt.exp_avg_sq["u"][rows], ref_opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=0
    )
    idle = torch.ones(V, dtype=torch.bool, device=device)
    idle[rows] = False
    assert torch.equal(got[idle], start[idle])
    assert not opt.exp_avg["u"][idle].any() and not opt.exp_avg_sq["u"][idle].any()


class _LazyRowReference:
    """The lazy semantics one row at a time, in float64: a second, loop-based reading of them."""

    def __init__(self, table: torch.Tensor) -> None:
        self.p = table.detach().double().clone()
        self.m = torch.zeros_like(self.p)
        self.v = torch.zeros_like(self.p)

    def step(self, ids: torch.Tensor, grad: torch.Tensor, lr: float, t: int) -> None:
        """Step number t of the optimizer (global: counts steps where this table was idle)."""
        b1, b2 = BETAS
        for i, row in enumerate(ids.tolist()):
            g = grad[i].double()
            self.p[row] *= 1 - lr * WD
            self.m[row] = b1 * self.m[row] + (1 - b1) * g
            self.v[row] = b2 * self.v[row] + (1 - b2) * g * g
            m_hat = self.m[row] / (1 - b1**t)
            v_hat = self.v[row] / (1 - b2**t)
            self.p[row] -= lr * m_hat / (v_hat.sqrt() + EPS)


def _random_rows(gen: torch.Generator, vocab: int) -> torch.Tensor:
    n = int(torch.randint(1, vocab // 2, (1,), generator=gen))
    return torch.randperm(vocab, generator=gen)[:n].sort().values


def test_varying_rows_match_per_row_reference() -> None:
    tables = {"a": _table(0), "b": _table(1, vocab=25)}
    refs = {name: _LazyRowReference(t) for name, t in tables.items()}
    opt = SparseRowAdamW(tables, betas=BETAS, eps=EPS, weight_decay=WD)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 61):
        lr = _lr(step)
        grads = {}
        for name, table in tables.items():
            # Table "b" sits out every third step; the global step still counts for it.
            if name == "b" and step % 3 == 0:
                continue
            ids = _random_rows(gen, table.shape[0])
            grad = torch.randn(len(ids), D, generator=gen) * 0.1
            grads[name] = (ids, grad)
            refs[name].step(ids, grad, lr, step)
        opt.step(grads, lr=lr)
    for name, table in tables.items():
        torch.testing.assert_close(table.detach().double(), refs[name].p, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.exp_avg[name].double(), refs[name].m, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(
            opt.exp_avg_sq[name].double(), refs[name].v, rtol=1e-5, atol=1e-12
        )


def test_skipped_table_still_counts_step() -> None:
    table = _table()
    opt = SparseRowAdamW({"u": table, "w": _table(1)}, betas=BETAS, eps=EPS)
    for _ in range(4):
        opt.step({"w": (torch.tensor([0]), torch.ones(1, D))}, lr=0.1)
    before = table.detach().clone()
    opt.step(
        {
            "u": (torch.tensor([3]), torch.ones(1, D)),
            "w": (torch.tensor([], dtype=torch.long), torch.ones(0, D)),
        },
        lr=0.1,
    )
    # Step 5 with m = 0.1 g, v = 0.001 g^2:
    # p moves by lr * (0.1 / (1 - 0.9^5)) / sqrt(0.001 / (1 - 0.999^5)).
    expected = 0.1 * (0.1 / (1 - 0.9**5)) / math.sqrt(0.001 / (1 - 0.999**5))
    torch.testing.assert_close(
        before[3] - table.detach()[3], torch.full((D,), expected), rtol=1e-5, atol=0
    )


def _run(opt: SparseRowAdamW, gen: torch.Generator, steps: range) -> None:
    for step in steps:
        ids = _random_rows(gen, V)
        opt.step({"u": (ids, torch.randn(len(ids), D, generator=gen))}, lr=_lr(step))


def test_state_dict_round_trip_continues_identically() -> None:
    table = _table()
    opt = SparseRowAdamW({"u": table}, betas=BETAS, eps=EPS, weight_decay=WD)
    _run(opt, torch.Generator().manual_seed(3), range(1, 21))

    saved = opt.state_dict()
    assert saved["step"] == 20 and isinstance(saved["step"], int)
    assert saved["tables"]["u"]["exp_avg"].shape == (V, D)
    saved = {
        "step": saved["step"],
        "tables": {"u": {k: t.clone() for k, t in saved["tables"]["u"].items()}},
    }
    table_copy = torch.nn.Parameter(table.detach().clone())
    resumed = SparseRowAdamW({"u": table_copy}, betas=BETAS, eps=EPS, weight_decay=WD)
    resumed.load_state_dict(saved)
    assert resumed.step_count == 20

    _run(opt, torch.Generator().manual_seed(4), range(21, 41))
    _run(resumed, torch.Generator().manual_seed(4), range(21, 41))
    assert torch.equal(table.detach(), table_copy.detach())
    assert torch.equal(opt.exp_avg["u"], resumed.exp_avg["u"])
    assert torch.equal(opt.exp_avg_sq["u"], resumed.exp_avg_sq["u"])


def test_load_state_dict_rejects_wrong_shape_and_names() -> None:
    opt = SparseRowAdamW({"decoder.layers.1.mlp.stem_table": _table()})
    sd = opt.state_dict()
    bad = {
        "step": 3,
        "tables": {
            "decoder.layers.1.mlp.stem_table": {
                "exp_avg": torch.zeros(V + 1, D),
                "exp_avg_sq": torch.zeros(V, D),
            }
        },
    }
    with pytest.raises(
        ValueError, match=r"decoder\.layers\.1\.mlp\.stem_table.*\(41, 6\).*\(40, 6\)"
    ):
        opt.load_state_dict(bad)
    assert opt.step_count == 0
    with pytest.raises(KeyError, match="missing tables.*stem_table.*unexpected.*other"):
        opt.load_state_dict(
            {"step": 1, "tables": {"other": sd["tables"]["decoder.layers.1.mlp.stem_table"]}}
        )


def test_bf16_table_updates_in_fp32_state() -> None:
    table = torch.nn.Parameter(_table().detach().bfloat16())
    opt = SparseRowAdamW({"u": table}, weight_decay=WD)
    ref = table.detach()[[2, 9]].float()  # the same start: bf16 values are exact in fp32
    ref_opt = torch.optim.AdamW([ref.requires_grad_()], lr=1e-2, weight_decay=WD)
    grad = torch.randn(2, D, generator=torch.Generator().manual_seed(5))
    ref.grad = grad.clone()
    ref_opt.step()
    opt.step({"u": (torch.tensor([2, 9]), grad)}, lr=1e-2)
    assert table.dtype == torch.bfloat16 and opt.exp_avg["u"].dtype == torch.float32
    # fp32 AdamW from the same start, rounded once to bf16: bitwise what torch's AdamW gives
    # (rounding moves a row by up to 4e-4 here, 4% of the ~1e-2 update; a bf16 state or a
    # second rounding would show).
    assert torch.equal(table.detach()[[2, 9]], ref.detach().bfloat16())


def test_rejects_bad_gradients() -> None:
    opt = SparseRowAdamW({"u": _table()})
    with pytest.raises(ValueError, match="sorted and unique"):
        opt.step({"u": (torch.tensor([3, 3]), torch.ones(2, D))})
    with pytest.raises(ValueError, match=r"grad \[m, 6\]"):
        opt.step({"u": (torch.tensor([3]), torch.ones(1, D + 1))})
    with pytest.raises(IndexError, match="0, 40"):
        opt.step({"u": (torch.tensor([40]), torch.ones(1, D))})
    with pytest.raises(KeyError, match="unknown table .v."):
        opt.step({"v": (torch.tensor([3]), torch.ones(1, D))})
    # A rejected step does not count.
    assert opt.step_count == 0


# ---- exact mode -------------------------------------------------------------------------


def _zipf_stream(gen: torch.Generator, vocab: int, steps: int, tokens: int = 48):
    """Per step: sorted unique Zipf(1.1) ids and gradients, 30% of elements ~1e-7 (there
    sqrt(v) is close to eps, where closed forms for the idle steps go wrong)."""
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    for _ in range(steps):
        ids = torch.multinomial(probs, tokens, replacement=True, generator=gen).unique()
        grad = torch.randn(len(ids), D, generator=gen)
        small = torch.rand(len(ids), D, generator=gen) < 0.3
        yield ids, torch.where(small, grad * 1e-7, grad * 1e-2)


def _warmup_cosine(step: int, total: int = 300, peak: float = 1e-3, warmup: int = 30) -> float:
    if step <= warmup:
        return peak * step / warmup
    return 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("kernel,device", [("torch", "cpu"), ("cpp", "cpu"), on_cuda("torch")])
def test_exact_matches_dense_adamw_over_zipf_stream(kernel: str, device: str) -> None:
    """300 steps vs torch.optim.AdamW on the whole table (idle rows get zero gradients).

    Tolerance on p: 1e-6 relative + 1e-6 * max|p| absolute. The replayed idle steps are
    bit-identical to torch and so are the moments (checked below); p differs where its
    weight decay over long idle stretches is one product instead of torch's per-step fp32
    roundings (a random walk of ~sqrt(k) ulps of p, which stays as an absolute error when
    the row later moves toward 0). Measured: 1.5e-8 absolute for max|p| = 0.03.

    The `cpp` kernel settles in closed form: its moments are m0 * beta^k with one rounding
    instead of k, an ulp or two of the moment's scale, which the next step's lerp can leave
    next to a much smaller result (m = 0.9 m + 0.1 g cancelling). So its moments are held to
    1e-6 relative + 1e-6 * max|moment| absolute, like p.
    """
    vocab = 300
    start = (torch.randn(vocab, D, generator=torch.Generator().manual_seed(6)) * 0.0076).to(device)
    table = torch.nn.Parameter(start.clone())
    dense = torch.nn.Parameter(start.clone())
    ref = torch.optim.AdamW([dense], lr=1.0, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    opt = SparseRowAdamW(
        {"u": table}, betas=BETAS, eps=EPS, weight_decay=WD, mode="exact", kernel=kernel
    )
    tol = {"rtol": 1e-6, "atol": 1e-6 * start.abs().max().item()}
    stream = _zipf_stream(torch.Generator().manual_seed(7), vocab, 300)
    for step, (ids, grad) in enumerate(stream, start=1):
        ids, grad = ids.to(device), grad.to(device)
        lr = _warmup_cosine(step)
        dense.grad = torch.zeros(vocab, D, device=device).index_copy_(0, ids, grad)
        ref.param_groups[0]["lr"] = lr
        ref.step()
        before = table.detach().clone()
        opt.step({"u": (ids, grad)}, lr=lr)
        idle = torch.ones(vocab, dtype=torch.bool, device=device).index_fill_(0, ids, False)
        # Idle rows are not written: their debt waits until they are touched or settled.
        assert torch.equal(table.detach()[idle], before[idle])
        if step == 150:
            # state_dict settles every row; resume into a fresh optimizer and table.
            saved = {
                "step": step,
                "tables": {"u": {k: t.clone() for k, t in opt.state_dict()["tables"]["u"].items()}},
            }
            torch.testing.assert_close(table.detach(), dense.detach(), **tol)
            table = torch.nn.Parameter(table.detach().clone())
            opt = SparseRowAdamW(
                {"u": table}, betas=BETAS, eps=EPS, weight_decay=WD, mode="exact", kernel=kernel
            )
            opt.load_state_dict(saved)
    opt.settle()
    state = ref.state[dense]
    torch.testing.assert_close(table.detach(), dense.detach(), **tol)
    for got, want, atol in (
        (opt.exp_avg["u"], state["exp_avg"], 1e-15),
        (opt.exp_avg_sq["u"], state["exp_avg_sq"], 1e-20),
    ):
        scale = 1e-6 * want.abs().max().item() if kernel == "cpp" else atol
        torch.testing.assert_close(got, want, rtol=1e-6, atol=scale)
    # The comparison is not vacuous: rows moved well beyond the tolerance.
    assert (dense.detach() - start).abs().max() > 1e-2


def test_exact_decays_rows_never_touched() -> None:
    table = _table()
    start = table.detach().clone()
    opt = SparseRowAdamW({"u": table, "w": _table(1)}, weight_decay=WD, mode="exact")
    lrs = [1e-2, 2e-2, 5e-3]
    for lr in lrs:
        opt.step({"w": (torch.tensor([0]), torch.ones(1, D))}, lr=lr)
    assert torch.equal(table.detach(), start)
    opt.settle()
    factor = math.prod(1 - lr * WD for lr in lrs)
    torch.testing.assert_close(table.detach(), start * factor, rtol=1e-6, atol=0)


def test_exact_tail_length() -> None:
    assert exact_tail_steps((0.9, 0.999)) == 221
    assert exact_tail_steps((0.9, 0.95)) == 271
    with pytest.raises(ValueError, match="beta1\\^2 < beta2"):
        SparseRowAdamW({"u": _table()}, betas=(0.99, 0.95), mode="exact")
    with pytest.raises(ValueError, match="one of 'lazy', 'exact', got 'dense'"):
        SparseRowAdamW({"u": _table()}, mode="dense")  # type: ignore[arg-type]
