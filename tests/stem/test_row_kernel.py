"""The C++ row kernel (stem/csrc) against SparseRowAdamW's torch paths, and the path choice."""

from __future__ import annotations

import logging

import pytest
import torch

from stem_megatron.stem.csrc import row_kernel
from stem_megatron.stem.sparse_adam import SparseRowAdamW

WD = 0.1


def _pair(kernels: tuple[str, str], vocab: int, dim: int, **kw) -> list[SparseRowAdamW]:
    start = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(0)) * 0.02
    return [
        SparseRowAdamW({"u": torch.nn.Parameter(start.clone())}, weight_decay=WD, kernel=k, **kw)
        for k in kernels
    ]


def _state(opt: SparseRowAdamW) -> list[torch.Tensor]:
    return [opt.tables["u"].detach(), opt.exp_avg["u"], opt.exp_avg_sq["u"]]


def _zipf_steps(vocab: int, dim: int, steps: int, tokens: int, seed: int = 1):
    """Sorted unique Zipf(1.1) ids and gradients, a third of the elements ~1e-7 (sqrt(v) near
    eps)."""
    gen = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    for step in range(1, steps + 1):
        ids = torch.multinomial(probs, tokens, replacement=True, generator=gen).unique()
        grad = torch.randn(len(ids), dim, generator=gen)
        small = torch.rand(len(ids), dim, generator=gen) < 0.3
        lr = 1e-3 * min(1.0, step / 20) * (0.5 + 0.5 * torch.rand((), generator=gen).item())
        yield ids, torch.where(small, grad * 1e-7, grad * 1e-2), lr


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.95)])
def test_lazy_step_is_bitwise_torch_fused(betas: tuple[float, float]) -> None:
    """The kernel computes AdamW(fused=True)'s vectorised arithmetic (FMA where it has one):
    bit-identical. dim 320: whole vectors for torch's kernel (its scalar tail, the last < 16
    elements of a buffer that is not, skips one FMA in v: 1 ulp there) and a full and a
    partial chunk of 256 per row for ours. (Against the single-tensor `torch` path p differs
    by ulps: torch's vectorised sqrt is not correctly rounded.)"""
    cpp, fused = _pair(("cpp", "torch_fused"), 500, 320, betas=betas)
    for ids, grad, lr in _zipf_steps(500, 320, 40, tokens=200):
        cpp.step({"u": (ids, grad)}, lr=lr)
        fused.step({"u": (ids, grad)}, lr=lr)
    for got, want in zip(_state(cpp), _state(fused)):
        assert torch.equal(got, want)


def test_exact_matches_torch_replay_over_long_idle_stretches() -> None:
    """300 steps of a Zipfian stream over 500 rows: cold rows owe more than the 221-step
    tail; early rows settle while the bias corrections still change fast (many groups in
    the kernel's series). The kernel settles in closed form; the torch path replays each
    step. Tolerance: 1e-6 relative + 1e-6 * max|x| absolute for p, exp_avg and exp_avg_sq."""
    cpp, ref = _pair(("cpp", "torch"), 500, 16, mode="exact")
    owed = []
    for ids, grad, lr in _zipf_steps(500, 16, 300, tokens=48):
        owed.append(int(cpp.step_count - cpp.exact.settled["u"][ids].min()))
        cpp.step({"u": (ids, grad)}, lr=lr)
        ref.step({"u": (ids, grad)}, lr=lr)
    assert max(owed) > 221
    for opt in (cpp, ref):
        opt.settle()
    for got, want in zip(_state(cpp), _state(ref)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert torch.equal(cpp.exact.settled["u"], ref.exact.settled["u"])


def test_settle_only_idle_rows_and_exact_state_dict() -> None:
    """Rows touched once and then idle for 300 steps: settle() moves them like torch's replay."""
    cpp, ref = _pair(("cpp", "torch"), 64, 40, mode="exact")
    grad = torch.randn(8, 40, generator=torch.Generator().manual_seed(3)) * 1e-3
    cpp.state_dict()  # settling at step 0: nothing owed
    for opt in (cpp, ref):
        opt.step({"u": (torch.arange(0, 64, 8), grad)}, lr=1e-3)
        for _ in range(300):
            opt.step({}, lr=1e-3)
    before = cpp.tables["u"].detach().clone()
    sd = cpp.state_dict()
    assert not torch.equal(cpp.tables["u"].detach(), before)
    ref.settle()
    for got, want in zip(
        [cpp.tables["u"].detach(), sd["tables"]["u"]["exp_avg"], sd["tables"]["u"]["exp_avg_sq"]],
        _state(ref),
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_choice_of_path(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    table = torch.nn.Parameter(torch.zeros(4, 3))
    with caplog.at_level(logging.INFO, logger=row_kernel.__name__):
        assert SparseRowAdamW({"u": table}).kernel == "cpp"
    assert "row update: cpp kernel" in caplog.text
    monkeypatch.setenv(row_kernel.ENV_VAR, "torch")
    assert SparseRowAdamW({"u": table}).kernel == "torch"
    # An explicit argument wins over the environment.
    assert SparseRowAdamW({"u": table}, kernel="cpp").kernel == "cpp"
    monkeypatch.setenv(row_kernel.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="STEM_ROW_KERNEL"):
        SparseRowAdamW({"u": table})
    monkeypatch.delenv(row_kernel.ENV_VAR)
    bf16 = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    caplog.clear()
    assert SparseRowAdamW({"u": bf16}).kernel == "torch"
    assert "torch fallback (needs contiguous fp32 CPU tables" in caplog.text
    with pytest.raises(RuntimeError, match="'cpp' unavailable"):
        SparseRowAdamW({"u": bf16}, kernel="cpp")
