"""The optimizers of a run: fused AdamW for dense parameters, row-sparse AdamW for STEM tables.

One LR schedule drives both: each group's LR is its base LR times `schedule.factor(step)`.
Global-norm clipping covers the dense gradients and the tables' row gradients together.
"""

from __future__ import annotations

import math

import torch

from stem_megatron.config import RunConfig
from stem_megatron.stem.sparse_adam import SparseRowAdamW
from stem_megatron.stem.table import StemTable


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # Megatron's rule: no decay for norms and biases (1-D parameters).
    return param.ndim == 1 or name.endswith(".bias")


class TrainingOptimizer:
    def __init__(self, model: torch.nn.Module, config: RunConfig):
        o = config.optim
        self.clip_grad = o.clip_grad
        self.tables: dict[str, StemTable] = {
            name: mod for name, mod in model.named_modules() if isinstance(mod, StemTable)}
        table_params = {id(t.weight) for t in self.tables.values()}
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if id(param) in table_params or not param.requires_grad:
                continue
            (no_decay if _no_weight_decay(name, param) else decay).append(param)
        self.dense_params = decay + no_decay
        self.base_lr = o.lr
        self.dense = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, fused=True)
        s = config.stem.optimizer
        self.table_lr = s.lr if s.lr is not None else o.lr
        self.sparse = SparseRowAdamW(
            {name: t.weight for name, t in self.tables.items()}, lr=self.table_lr,
            betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=s.weight_decay,
            mode=s.mode)

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        for table in self.tables.values():
            table.grad_accumulator.clear()

    def unique_rows(self) -> int:
        """Distinct table rows with a gradient this step, summed over tables."""
        return sum(t.grad_accumulator.num_rows for t in self.tables.values())

    def grad_norm(self) -> float:
        """L2 norm over every dense gradient and every table's combined row gradient."""
        grads = [p.grad for p in self.dense_params if p.grad is not None]
        squared = torch.zeros((), dtype=torch.float32)
        if grads:
            squared += torch.nn.utils.get_total_norm(grads).float().cpu() ** 2
        for table in self.tables.values():
            if not table.grad_accumulator.is_empty:
                squared += table.grad_accumulator.squared_norm().cpu()
        return math.sqrt(squared.item())

    def step(self, lr_factor: float) -> dict[str, float]:
        """Clip, then update dense parameters and touched table rows. Returns metrics."""
        norm = self.grad_norm()
        if not math.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm}: training diverged "
                                     f"(lower optim.lr or check the data)")
        if self.clip_grad > 0 and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1e-6)
            torch.nn.utils.clip_grads_with_norm_(self.dense_params, self.clip_grad,
                                                 torch.tensor(norm))
            for table in self.tables.values():
                table.grad_accumulator.scale_(scale)
        for group in self.dense.param_groups:
            group["lr"] = self.base_lr * lr_factor
        self.dense.step()
        self.sparse.step({name: t.grad_accumulator.reduce() for name, t in self.tables.items()
                          if not t.grad_accumulator.is_empty},
                         lr=self.table_lr * lr_factor)
        return {"optim/grad_norm": norm, "optim/lr": self.base_lr * lr_factor,
                "optim/table_lr": self.table_lr * lr_factor}

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(), "stem": self.sparse.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["stem"])
