"""The optimizer step of a run: megatron-core's optimizer for dense parameters, StemTables' for
the tables, one global norm over both.

Dense: `get_megatron_optimizer` over the DDP-wrapped chunks, as Megatron-LM builds it: AdamW on
the parameters themselves (fp32), on fp32 main copies of bf16 parameters (`train.bf16`), or on
fp32 main shards split over DP (`optim.use_distributed_optimizer`), optionally on the host
(`optim.optimizer_cpu_offload`). It never sees the tables (hidden while it is built). One LR
schedule drives both: each group's LR is its base LR times `schedule.factor(step)`.
Global-norm clipping covers the dense gradients and the tables' row gradients together, so
megatron's own clipping is off and its step is run in its parts (`optimizer_step`).
"""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import OptimizerConfig, clip_grads, get_megatron_optimizer

from stem_megatron.config import RunConfig
from stem_megatron.parallel.data_parallel import tables_hidden
from stem_megatron.stem.table import is_stem_table
from stem_megatron.stem.tables import StemTables
from stem_megatron.training.model_chunks import named_parameters


def dense_optimizer_config(config: RunConfig) -> OptimizerConfig:
    """megatron-core's optimizer settings from ours (Megatron's names on both sides). Its
    clipping is off: ours clips over dense and table gradients together. Weight decay follows
    megatron's rule: none for biases and 1-D parameters (norms)."""
    o, bf16 = config.optim, config.train.bf16
    return OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=0.0,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
        optimizer_cpu_offload=o.optimizer_cpu_offload,
        optimizer_offload_fraction=o.optimizer_offload_fraction,
    )


class DenseOptimizer:
    """megatron-core's optimizer over the dense parameters of `wrapped_chunks` (`chunks` in
    megatron-core's DDP, parallel/data_parallel.py), with its step in parts."""

    def __init__(
        self,
        wrapped_chunks: list[torch.nn.Module],
        chunks: list[torch.nn.Module],
        config: RunConfig,
    ):
        self.params = [
            p for _, p in named_parameters(chunks) if not is_stem_table(p) and p.requires_grad
        ]
        self.base_lr, self.weight_decay = config.optim.lr, config.optim.weight_decay
        with tables_hidden(chunks):
            self.megatron = get_megatron_optimizer(dense_optimizer_config(config), wrapped_chunks)

    @property
    def parts(self) -> list:
        """megatron-core's optimizers behind `megatron` (a ChainedOptimizer holds several)."""
        return getattr(self.megatron, "chained_optimizers", [self.megatron])

    def zero_grad(self) -> None:
        self.megatron.zero_grad(set_to_none=True)

    def prepare_grads(self) -> None:
        """Main gradients from the DDP buffers (no loss scaling)."""
        self.megatron.prepare_grads()

    def grad_norm(self) -> float:
        """megatron-core's norm of the main gradients: TP duplicates and the tied embedding's
        copy counted once, over the whole model."""
        return float(self.megatron.get_grad_norm() or 0.0)

    def clip_(self, max_norm: float, total_norm: float) -> None:
        for part in self.parts:
            clip_grads.clip_grad_by_total_norm_fp32(part.get_parameters(), max_norm, total_norm)

    def step(self, lr_factor: float) -> None:
        # What megatron's OptimizerParamScheduler sets: its groups carry multipliers (no
        # weight decay for biases and norms: wd_mult 0), the torch optimizer reads the products.
        for group in self.megatron.param_groups:
            group["lr"] = self.base_lr * lr_factor * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)
        self.megatron.step_with_ready_grads()


def optimizer_step(
    dense: DenseOptimizer, tables: StemTables, clip_grad: float, lr_factor: float
) -> dict[str, float]:
    """After the schedule: sync table rows over DP, clip dense and table gradients by their
    global norm, update both. Returns the step's optimizer and table metrics."""
    tables.reduce_grads()
    dense.prepare_grads()
    # One L2 norm over dense and table gradients (dense first: both reduce over groups).
    norm = math.sqrt(dense.grad_norm() ** 2 + tables.squared_norm().item())
    if not math.isfinite(norm):
        raise FloatingPointError(
            f"gradient norm is {norm}: training diverged (lower optim.lr or check the data)"
        )
    if clip_grad > 0 and norm > clip_grad:
        dense.clip_(clip_grad, norm)
        tables.scale_(clip_grad / (norm + 1e-6))
    dense.step(lr_factor)
    return {
        "optim/grad_norm": norm,
        "optim/lr": dense.base_lr * lr_factor,
        **tables.step(lr_factor),
    }
