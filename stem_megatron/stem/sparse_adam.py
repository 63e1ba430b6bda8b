"""AdamW for STEM tables that updates only the rows a step's gradient touched.

The tables never go through the dense optimizer: their gradients arrive row-sparse as
(sorted unique ids [m], grad [m, d]) from `stem.lookup.RowGradAccumulator.reduce()` (after
any data-parallel row sync), and this optimizer reads and writes only those m rows of the
param, exp_avg and exp_avg_sq. Per element that is 28 bytes of traffic in fp32 instead of
28 * V / m bytes for a dense AdamW over the whole table.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from stem_megatron.modes import TableOptimizerMode
from stem_megatron.stem.csrc import row_kernel
from stem_megatron.stem.csrc.row_kernel import Kernel
from stem_megatron.stem.exact_history import ExactHistory


class SparseRowAdamW:
    """Row-sparse AdamW over a dict of named tables [V, d].

    Each step reads and writes only the rows in that step's gradient. For those rows the
    update is one step of torch.optim.AdamW, in the same formula and operation order, in fp32:

        p <- p * (1 - lr * wd)
        m <- lerp(m, g, 1 - beta1)
        v <- v * beta2 + (1 - beta2) * g * g
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    t is the optimizer's global step count: every `step` call counts, for every table and
    row, whether or not it had a gradient. The modes differ in how idle rows are treated.

    `lazy` (torch.optim.SparseAdam plus decoupled weight decay on touched rows): idle rows
    are frozen, with no momentum or second-moment decay, no movement from the remaining
    momentum and no weight decay while they have no gradient. A row seen for the first time
    at step 1000 gets almost no bias-correction boost (as in SparseAdam); a row touched on
    every step behaves exactly like dense AdamW. Cheap, but not equal to dense AdamW.

    `exact`: equal to dense AdamW over the whole table, where idle rows have gradient 0,
    without touching idle rows every step. Each row remembers the step it was last settled
    at; when it is next touched, its owed idle steps are replayed first: the first
    `exact_tail_steps(betas)` of them (221 for (0.9, 0.999)) one by one with the LR
    schedule's values (that is where eps makes closed forms inexact), the rest in closed
    form (decays by powers and a prefix product of the weight-decay factors), which drops
    a total movement below 2^-24 * lr. Rows whose momentum is zero (never touched) only
    decay. Against torch.optim.AdamW (300 steps, Zipfian ids, warmup + cosine, wd 0.1, 30%
    of gradient elements ~1e-7): the moments are bit-identical, p is within 1e-6 relative +
    1e-6 * max|p| absolute (tests/stem/test_sparse_adam.py): the closed-form weight decay
    skips torch's per-step fp32 roundings of p, a random walk of ~sqrt(k) ulps.
    `settle()` brings every row up to date: call it (`state_dict()` does) before reading
    the tables for a checkpoint, an export or an edit. Cost: up to 221 replayed row-steps
    for a row that was idle long enough, so a step costs more than in lazy mode.

    `kernel` picks the code that updates the rows (`csrc/row_kernel.py`; the default `auto`
    takes the C++ kernel when it builds): `cpp` updates rows in place in one pass and settles
    exact mode's idle steps in closed form in that pass (no replay; against the `torch` path
    within 1e-6 relative + 1e-6 * max|p| absolute in p and 1e-6 relative in the moments,
    tests/stem/test_row_kernel.py); `torch` is the reference described above; `torch_fused`
    computes the row step with the kernel of torch.optim.AdamW(fused=True) (ulp-level
    differences in p from the single-tensor path).

    The state (exp_avg, exp_avg_sq: full [V, d] fp32 tensors) lives on the table's device,
    or wherever `allocate(shape, dtype)` puts zero tensors (the `mmap` tier: mapped files).
    The table is updated in place through `table.data`; a bf16 table is updated in fp32
    and rounded once when written back.
    """

    _SETTLE_BLOCK = 1 << 16

    def __init__(
        self,
        tables: Mapping[str, torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: TableOptimizerMode | str = TableOptimizerMode.LAZY,
        kernel: Kernel = "auto",
        allocate: Callable[[tuple[int, ...], torch.dtype], Tensor] | None = None,
    ) -> None:
        if mode not in {m.value for m in TableOptimizerMode}:
            raise ValueError(
                f"SparseRowAdamW mode must be one of {TableOptimizerMode.choices()}, got {mode!r}"
            )
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(
                f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}"
            )
        for name, table in tables.items():
            if table.dim() != 2:
                raise ValueError(
                    f"table {name!r} must be 2-D [vocab, d], got shape {tuple(table.shape)}"
                )
        self.tables: dict[str, torch.nn.Parameter] = dict(tables)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.mode = TableOptimizerMode(mode)
        self.kernel = row_kernel.select(kernel, list(self.tables.values()))
        self.step_count = 0
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}
        for name, table in self.tables.items():
            for state in (self.exp_avg, self.exp_avg_sq):
                state[name] = (
                    allocate(tuple(table.shape), torch.float32)
                    if allocate
                    else torch.zeros(table.shape, dtype=torch.float32, device=table.device)
                )
        self.exact = None  # exact mode: each row's settled step and the LR history
        if self.mode == TableOptimizerMode.EXACT:
            self.exact = ExactHistory(self.tables, betas, eps, weight_decay, self.step_count)

    @torch.no_grad()
    def step(self, grads: Mapping[str, tuple[Tensor, Tensor]], lr: float | None = None) -> None:
        """One optimizer step. `grads[name] = (sorted unique ids [m], grad [m, d])`.

        Tables missing from `grads` or with m == 0 are skipped but the global step still
        advances. `lr` is this step's scheduled learning rate (default: the constructor's).
        Every gradient is checked before anything moves.
        """
        for name, (ids, grad) in grads.items():
            self._check_table_rows(name, ids, grad)
        lr = self.start_step(lr)
        for name, (ids, grad) in grads.items():
            self._update_rows(name, ids, grad, lr)

    def start_step(self, lr: float | None = None) -> float:
        """Advance the global step (every table's t) and return this step's LR; then call
        `update_table` once per table with a gradient, in any order or thread (one table at
        a time per table). `step` does both."""
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        if self.exact is not None:
            self.exact.record(lr, self.step_count)
        return lr

    @torch.no_grad()
    def update_table(self, name: str, ids: Tensor, grad: Tensor, lr: float) -> None:
        """This step's update of table `name`'s rows `ids` (sorted, unique) with `grad`."""
        self._check_table_rows(name, ids, grad)
        self._update_rows(name, ids, grad, lr)

    def _update_rows(self, name: str, ids: Tensor, grad: Tensor, lr: float) -> None:
        if ids.numel() == 0:
            return
        table = self.tables[name]
        ids = ids.to(table.device)
        grad = grad.to(device=table.device, dtype=torch.float32)
        if self.kernel == "cpp":
            self._cpp_rows(name, ids, grad.contiguous(), lr)
            return
        if self.exact is not None:
            self.exact.settle_rows(
                name, table, self.exp_avg[name], self.exp_avg_sq[name], ids, self.step_count - 1
            )
        p = table.data.index_select(0, ids).float()
        m = self.exp_avg[name].index_select(0, ids)
        v = self.exp_avg_sq[name].index_select(0, ids)
        self._adamw_rows(p, m, v, grad, lr, self.step_count)
        table.data.index_copy_(0, ids, p.to(table.dtype))
        self.exp_avg[name].index_copy_(0, ids, m)
        self.exp_avg_sq[name].index_copy_(0, ids, v)
        if self.exact is not None:
            self.exact.mark(name, ids, self.step_count)

    def _check_table_rows(self, name: str, ids: Tensor, grad: Tensor) -> None:
        if name not in self.tables:
            raise KeyError(f"gradients for unknown table {name!r}; known: {sorted(self.tables)}")
        self._check_rows(name, self.tables[name], ids, grad)

    def _adamw_rows(self, p: Tensor, m: Tensor, v: Tensor, g: Tensor, lr: float, step: int) -> None:
        """One torch.optim.AdamW step on gathered rows: the single-tensor path's ops in its
        order, or (`torch_fused`) the kernel of AdamW(fused=True)."""
        beta1, beta2 = self.betas
        if self.kernel == "torch_fused":
            # One pass over the rows instead of ~10 (benchmarks/bench_table_update.py); p differs
            # from the single-tensor path by a few ulps, as AdamW(fused=True) does.
            step_t = torch.tensor(float(step), device=p.device)
            torch._fused_adamw_(
                [p],
                [g],
                [m],
                [v],
                [],
                [step_t],
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=self.weight_decay,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
            )
            return
        if self.weight_decay != 0:
            p.mul_(1 - lr * self.weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (v.sqrt() / bias_correction2**0.5).add_(self.eps)
        p.addcdiv_(m, denom, value=-step_size)

    def _cpp_rows(self, name: str, ids: Tensor, grad: Tensor | None, lr: float) -> None:
        """The C++ kernel on rows `ids`: in exact mode settle their owed idle steps, then
        (with `grad`) take this step; one pass over each row. Without `grad`: settle only,
        up to the current step."""
        beta1, beta2 = self.betas
        t = self.step_count
        step = row_kernel.StepArgs()  # settling alone: unused (and t may still be 0)
        if grad is not None:
            step = row_kernel.StepArgs(
                wd_factor=1 - lr * self.weight_decay,
                lerp_weight=1 - beta1,
                beta2=beta2,
                one_minus_beta2=1 - beta2,
                neg_step_size=-(lr / (1 - beta1**t)),
                bc2_sqrt=(1 - beta2**t) ** 0.5,
                eps=self.eps,
            )
        settle = row_kernel.SettleArgs()
        if self.exact is not None:
            settle = self.exact.kernel_args(name, t - 1 if grad is not None else t, t)
        ids = ids.contiguous()
        row_kernel.load().stem_row_adamw(
            self.tables[name].data.data_ptr(),
            self.exp_avg[name].data_ptr(),
            self.exp_avg_sq[name].data_ptr(),
            self.tables[name].shape[1],
            ids.data_ptr(),
            ids.numel(),
            None if grad is None else grad.data_ptr(),
            ctypes.byref(step),
            ctypes.byref(settle),
            torch.get_num_threads(),
        )

    @torch.no_grad()
    def settle_rows(self, rows: Mapping[str, Tensor]) -> None:
        """Exact mode: bring the given rows ({table: sorted unique ids}) up to the current step,
        as dense AdamW would have moved them while idle. Call before a step reads them, so the
        forward sees the values dense AdamW would have (a no-op in lazy mode)."""
        if self.exact is None:
            return
        for name, ids in rows.items():
            if ids.numel() == 0:
                continue
            self._settle(name, ids)

    def _settle(self, name: str, ids: Tensor) -> None:
        if self.kernel == "cpp":
            self._cpp_rows(name, ids, None, self.lr)
        else:
            self.exact.settle_rows(
                name,
                self.tables[name],
                self.exp_avg[name],
                self.exp_avg_sq[name],
                ids,
                self.step_count,
            )

    def unsettled(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Of `rows` ({table: ids}), those that owe idle steps: the rows `settle_rows` would
        write (none in lazy mode)."""
        if self.exact is None:
            return {name: ids[:0] for name, ids in rows.items()}
        return {name: self.exact.owing(name, ids, self.step_count) for name, ids in rows.items()}

    def settle(self) -> None:
        """Exact mode: bring every row of every table up to the current step (lazy: a no-op)."""
        if self.exact is None:
            return
        for name, table in self.tables.items():
            if self.kernel == "cpp":
                self._settle(name, torch.arange(table.shape[0]))
                continue
            # In blocks: settling gathers fp32 copies of the rows' param and moments.
            for start in range(0, table.shape[0], self._SETTLE_BLOCK):
                stop = min(start + self._SETTLE_BLOCK, table.shape[0])
                self._settle(name, torch.arange(start, stop, device=table.device))
        self.exact.reset(self.step_count)

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
        # One host sync for all three checks; the details only when one failed.
        valid = (ids[0] >= 0) & (ids[-1] < table.shape[0])
        if ids.numel() > 1:
            valid &= (ids[1:] > ids[:-1]).all()
        if bool(valid):
            return
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError(f"table {name!r}: row ids must be sorted and unique")
        if int(ids[0]) < 0 or int(ids[-1]) >= table.shape[0]:
            raise IndexError(
                f"table {name!r}: row ids must lie in [0, {table.shape[0]}), "
                f"got {int(ids[0])}..{int(ids[-1])}"
            )

    def state_dict(self) -> dict[str, Any]:
        """{"step": int, "tables": {name: {"exp_avg": [V, d], "exp_avg_sq": [V, d]}}}.

        Exact mode settles every row first (updating the tables in place), so the state
        needs no per-row steps or LR history and both modes share one format. The tensors
        are the live state (not copies), so a checkpointer that loads in place
        (torch.distributed.checkpoint) can fill them directly.
        """
        self.settle()
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
                f"SparseRowAdamW state mismatch: missing tables {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        for name, entry in tables.items():
            for key in ("exp_avg", "exp_avg_sq"):
                want, got = tuple(self.tables[name].shape), tuple(entry[key].shape)
                if got != want:
                    raise ValueError(
                        f"table {name!r} {key}: checkpoint shape {got} != table shape {want}"
                    )
        for name, entry in tables.items():
            self.exp_avg[name].copy_(entry["exp_avg"])
            self.exp_avg_sq[name].copy_(entry["exp_avg_sq"])
        self.step_count = int(state_dict["step"])
        if self.exact is not None:
            self.exact.reset(self.step_count)
