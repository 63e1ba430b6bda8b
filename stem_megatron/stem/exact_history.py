"""Exact mode's memory (SparseRowAdamW, `stem.optimizer.mode=exact`): the step each row was
last settled at, and the per-step LR factors since every row was last current, from which the
idle steps a row owes are replayed (torch path) or settled in closed form (C++ kernel).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from stem_megatron.stem.csrc import row_kernel

# Rows of the per-step history; column i is step base + 1 + i, except _LOG_DECAY whose
# column i sums log(decay) over steps base + 1 .. base + i.
_LR, _STEP_SIZE, _INV_BC2_SQRT, _DECAY, _LOG_DECAY = range(5)


def f32(x: float) -> float:
    """x rounded to fp32: torch applies a Python scalar to an fp32 tensor in fp32."""
    return torch.tensor(x, dtype=torch.float32).item()


def exact_tail_steps(betas: tuple[float, float], rel_tol: float = 2.0**-24) -> int:
    """Idle steps after which the rest of a row's decaying momentum moves it by < rel_tol * lr.

    With zero gradients, idle step j moves a row by at most lr / (1 - beta1) * |m| / sqrt(v)
    * r^j with r = beta1 / sqrt(beta2), and Cauchy-Schwarz over the gradient history gives
    |m| / sqrt(v) <= (1 - beta1) / sqrt((1 - beta2) * (1 - beta1^2 / beta2)). eps in the
    denominator only shrinks the movement. So steps past J move the row by at most
    lr * C * r^(J+1) / (1 - r) in total; J is the smallest with that below rel_tol * lr.
    (0.9, 0.999): J = 221.
    """
    beta1, beta2 = betas
    if beta1 == 0.0:
        return 1
    if beta1**2 >= beta2:
        raise ValueError(
            f"exact mode needs beta1^2 < beta2 for the momentum tail to vanish, got {betas}"
        )
    r = beta1 / math.sqrt(beta2)
    c = 1.0 / math.sqrt((1 - beta2) * (1 - beta1**2 / beta2))
    return max(1, math.ceil(math.log(rel_tol * (1 - r) / c) / math.log(r)) - 1)


def _row_ptr(row: np.ndarray) -> ctypes._Pointer:
    return row.ctypes.data_as(ctypes.POINTER(ctypes.c_double))


class ExactHistory:
    """Per-row settled steps of `tables` ({name: [V, d]}) and the per-step history since
    `base` (the step at which every row was last current)."""

    def __init__(
        self,
        tables: Mapping[str, Tensor],
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        step: int,
    ):
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.tail = exact_tail_steps(betas)
        self.settled = {
            n: torch.zeros(t.shape[0], dtype=torch.long, device=t.device) for n, t in tables.items()
        }
        self.reset(step)

    def reset(self, step: int) -> None:
        """Forget the LR history: every row is settled up to `step`."""
        self.base = step
        for settled in self.settled.values():
            settled.fill_(step)
        # Per-step values since base (rows _LR.. above); grows by doubling.
        self.hist = np.zeros((5, 1024))

    def record(self, lr: float, step: int) -> None:
        """Append step `step`'s LR and the per-step factors the settling needs."""
        n = step - self.base
        if n >= self.hist.shape[1]:
            self.hist = np.concatenate([self.hist, np.zeros_like(self.hist)], axis=1)
        beta1, beta2 = self.betas
        decay = f32(1 - lr * self.weight_decay)  # rounded to fp32 like torch applies it
        h, i = self.hist, n - 1
        h[_LR, i], h[_DECAY, i] = lr, decay
        h[_STEP_SIZE, i] = lr / (1 - beta1**step)
        h[_INV_BC2_SQRT, i] = 1 / (1 - beta2**step) ** 0.5
        h[_LOG_DECAY, n] = h[_LOG_DECAY, i] + math.log(decay)

    def owing(self, name: str, ids: Tensor, upto: int) -> Tensor:
        """Of rows `ids` of table `name`, those settled before step `upto`."""
        return ids[self.settled[name].index_select(0, ids) < upto]

    def mark(self, name: str, ids: Tensor, step: int) -> None:
        self.settled[name].index_fill_(0, ids, step)

    def kernel_args(self, name: str, upto: int, step: int) -> row_kernel.SettleArgs:
        """What the C++ kernel needs to settle rows of `name` up to `upto` at step `step`."""
        beta1, beta2 = self.betas
        h = self.hist
        return row_kernel.SettleArgs(
            settled=row_kernel.ptr(self.settled[name], ctypes.c_int64),
            upto=upto,
            base=self.base,
            step_size=_row_ptr(h[_STEP_SIZE]),
            inv_bc2_sqrt=_row_ptr(h[_INV_BC2_SQRT]),
            decay=_row_ptr(h[_DECAY]),
            log_decay=_row_ptr(h[_LOG_DECAY]),
            tail=self.tail,
            beta1_idle=1 - f32(1 - beta1),
            beta2_idle=f32(beta2),
            eps=self.eps,
            settled_to=step,
        )

    def settle_rows(
        self, name: str, table: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ids: Tensor, upto: int
    ) -> None:
        """Bring rows `ids` from their settled step to step `upto`, as dense AdamW would move
        them with zero gradients (the torch path)."""
        settled = self.settled[name].index_select(0, ids)
        owing = settled < upto
        if not bool(owing.any()):
            return
        ids, settled = ids[owing], settled[owing]
        p = table.data.index_select(0, ids).float()
        m = exp_avg.index_select(0, ids)
        v = exp_avg_sq.index_select(0, ids)
        # Replay the first idle steps one by one while the momentum can still move the row;
        # a row with zero momentum never moves (m / denom == 0), it only decays.
        moving = (m != 0).any(dim=1)
        replay = torch.where(moving, (upto - settled).clamp(max=self.tail), 0)
        # Longest debts first, so step j acts on a contiguous prefix of the rows.
        order = torch.argsort(replay, descending=True)
        ids, settled, replay = ids[order], settled[order], replay[order]
        p, m, v = p[order], m[order], v[order]
        active = torch.bincount(replay, minlength=self.tail + 1).flip(0).cumsum(0).flip(0).tolist()
        lrs = torch.from_numpy(self.hist[_LR]).to(p.device)
        for j in range(1, int(replay[0]) + 1):
            n = active[j]
            self._idle_step(
                p[:n], m[:n], v[:n], lrs[settled[:n] + j - 1 - self.base], settled[:n] + j
            )
        # The remaining idle steps only decay: m, v by powers of the fp32 betas torch applies,
        # p by the prefix product of its fp32 weight-decay factors.
        beta1, beta2 = self.betas
        done = settled + replay
        rest = (upto - done).to(torch.float64)
        m.mul_(((1 - f32(1 - beta1)) ** rest).to(torch.float32)[:, None])
        v.mul_((f32(beta2) ** rest).to(torch.float32)[:, None])
        if self.weight_decay != 0:
            log_decay = torch.from_numpy(self.hist[_LOG_DECAY]).to(p.device)
            decay = torch.exp(log_decay[upto - self.base] - log_decay[done - self.base])
            p.mul_(decay.to(torch.float32)[:, None])
        table.data.index_copy_(0, ids, p.to(table.dtype))
        exp_avg.index_copy_(0, ids, m)
        exp_avg_sq.index_copy_(0, ids, v)
        self.settled[name].index_fill_(0, ids, upto)

    def _idle_step(self, p: Tensor, m: Tensor, v: Tensor, lr: Tensor, step: Tensor) -> None:
        """One AdamW step with g = 0 and a per-row step number and LR ([n] tensors), rounding
        each per-row scalar to fp32 as torch does with its Python scalars."""
        beta1, beta2 = self.betas
        if self.weight_decay != 0:
            p.mul_((1 - lr * self.weight_decay).to(torch.float32)[:, None])
        m.lerp_(m.new_zeros(()), 1 - beta1)
        v.mul_(beta2)
        t = step.to(torch.float64)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        neg_step_size = (-(lr / bias_correction1)).to(torch.float32)[:, None]
        denom = (v.sqrt() / (bias_correction2**0.5).to(torch.float32)[:, None]).add_(self.eps)
        # addcdiv_ computes p + (value * m) / denom; keep that order.
        p.add_((neg_step_size * m).div_(denom))
