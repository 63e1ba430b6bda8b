"""AdamW for STEM tables that updates only the rows a step's gradient touched.

The tables never go through the dense optimizer: their gradients arrive row-sparse as
(sorted unique ids [m], grad [m, d]) from `stem.lookup.RowGradAccumulator.reduce()` (after
any data-parallel row sync), and this optimizer reads and writes only those m rows of the
param, exp_avg and exp_avg_sq. Per element that is 28 bytes of traffic in fp32 instead of
28 * V / m bytes for a dense AdamW over the whole table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

Mode = Literal["lazy"]


class SparseRowAdamW:
    """Row-sparse AdamW over a dict of named tables [V, d] (lazy mode).

    Lazy semantics (torch.optim.SparseAdam plus decoupled weight decay): at each step only
    the rows present in that step's gradient change; for them the update is exactly one
    step of torch.optim.AdamW, in the same formula and operation order, in fp32:

        p <- p * (1 - lr * wd)
        m <- lerp(m, g, 1 - beta1)
        v <- v * beta2 + (1 - beta2) * g * g
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Choices, stated because they differ from dense AdamW:
    - t is the optimizer's global step count (every `step` call counts, for every table,
      whether or not the table or a row had a gradient), not a per-row count. A row seen
      for the first time at step 1000 thus gets almost no bias-correction boost, as in
      torch.optim.SparseAdam. A row touched on every step behaves exactly like dense AdamW.
    - Idle rows are frozen: no momentum decay, no second-moment decay, no movement from the
      remaining momentum and no weight decay while they have no gradient. (Dense AdamW
      would keep moving and decaying them; an `exact` mode that settles that debt when a
      row is next touched is the planned second mode.)

    The state (exp_avg, exp_avg_sq: full [V, d] fp32 tensors) lives on the table's device.
    The table is updated in place through `table.data`; a bf16 table is updated in fp32
    and rounded once when written back.
    """

    def __init__(
        self,
        tables: Mapping[str, torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: Mode = "lazy",
    ) -> None:
        if mode != "lazy":
            raise ValueError(f"SparseRowAdamW mode must be 'lazy', got {mode!r}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        for name, table in tables.items():
            if table.dim() != 2:
                raise ValueError(f"table {name!r} must be 2-D [vocab, d], got shape {tuple(table.shape)}")
        self.tables: dict[str, torch.nn.Parameter] = dict(tables)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.mode: Mode = mode
        self.step_count = 0
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}
        for name, table in self.tables.items():
            self.exp_avg[name] = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
            self.exp_avg_sq[name] = torch.zeros(table.shape, dtype=torch.float32, device=table.device)

    @torch.no_grad()
    def step(self, grads: Mapping[str, tuple[Tensor, Tensor]], lr: float | None = None) -> None:
        """One optimizer step. `grads[name] = (sorted unique ids [m], grad [m, d])`.

        Tables missing from `grads` or with m == 0 are skipped but the global step still
        advances. `lr` is this step's scheduled learning rate (default: the constructor's).
        """
        unknown = set(grads) - set(self.tables)
        if unknown:
            raise KeyError(f"gradients for unknown tables {sorted(unknown)}; known: {sorted(self.tables)}")
        for name, (ids, grad) in grads.items():
            self._check_rows(name, self.tables[name], ids, grad)
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        for name, (ids, grad) in grads.items():
            if ids.numel() == 0:
                continue
            table = self.tables[name]
            ids = ids.to(table.device)
            p = table.data.index_select(0, ids).float()
            m = self.exp_avg[name].index_select(0, ids)
            v = self.exp_avg_sq[name].index_select(0, ids)
            self._adamw_rows(p, m, v, grad.to(device=table.device, dtype=torch.float32), lr, self.step_count)
            table.data.index_copy_(0, ids, p.to(table.dtype))
            self.exp_avg[name].index_copy_(0, ids, m)
            self.exp_avg_sq[name].index_copy_(0, ids, v)

    def _adamw_rows(self, p: Tensor, m: Tensor, v: Tensor, g: Tensor, lr: float, step: int) -> None:
        """One torch.optim.AdamW step (single-tensor path, same op order) on gathered rows."""
        beta1, beta2 = self.betas
        if self.weight_decay != 0:
            p.mul_(1 - lr * self.weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (v.sqrt() / bias_correction2**0.5).add_(self.eps)
        p.addcdiv_(m, denom, value=-step_size)

    @staticmethod
    def _check_rows(name: str, table: Tensor, ids: Tensor, grad: Tensor) -> None:
        if ids.dim() != 1 or grad.shape != (ids.numel(), table.shape[1]):
            raise ValueError(
                f"table {name!r}: expected ids [m] and grad [m, {table.shape[1]}], "
                f"got {tuple(ids.shape)} and {tuple(grad.shape)}"
            )
        # Sorted and unique (as RowGradAccumulator.reduce returns them): duplicate ids would
        # make index_copy_ keep an arbitrary one of the competing updates.
        if ids.numel() == 0:
            return
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError(f"table {name!r}: row ids must be sorted and unique")
        if int(ids[0]) < 0 or int(ids[-1]) >= table.shape[0]:
            raise IndexError(f"table {name!r}: row ids must lie in [0, {table.shape[0]}), got {int(ids[0])}..{int(ids[-1])}")

    def state_dict(self) -> dict[str, Any]:
        """{"step": int, "tables": {name: {"exp_avg": [V, d], "exp_avg_sq": [V, d]}}}.

        The tensors are the live state (not copies), so a checkpointer that loads in place
        (torch.distributed.checkpoint) can fill them directly.
        """
        return {
            "step": self.step_count,
            "tables": {
                name: {"exp_avg": self.exp_avg[name], "exp_avg_sq": self.exp_avg_sq[name]}
                for name in self.tables
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Copy a `state_dict()` into this optimizer's state after checking names and shapes."""
        tables = state_dict["tables"]
        missing, unexpected = set(self.tables) - set(tables), set(tables) - set(self.tables)
        if missing or unexpected:
            raise KeyError(
                f"SparseRowAdamW state mismatch: missing tables {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        for name, entry in tables.items():
            for key in ("exp_avg", "exp_avg_sq"):
                want, got = tuple(self.tables[name].shape), tuple(entry[key].shape)
                if got != want:
                    raise ValueError(f"table {name!r} {key}: checkpoint shape {got} != table shape {want}")
        for name, entry in tables.items():
            self.exp_avg[name].copy_(entry["exp_avg"])
            self.exp_avg_sq[name].copy_(entry["exp_avg_sq"])
        self.step_count = int(state_dict["step"])
