"""The trainer's optimizers on one real step of a tiny model: the global gradient norm and
clipping cover the STEM tables' row gradients, the tables get their own lr and weight_decay,
and the dense parameters use megatron-core's optimizer of the configured kind (no table in it).

Adam divides a gradient by its own magnitude, so a clipped and an unclipped gradient move a
parameter alike unless the clipped one is near adam_eps: the clipping test uses a clip_grad
small enough for that (and checks that the alternatives it must reject are far off)."""

from __future__ import annotations

import math

import torch

from stem_megatron.stem.sparse_adam import SparseRowAdamW
from stem_megatron.training.trainer import Trainer

# Distinct from each other and from the dense optim.lr / optim.weight_decay.
TABLE_LR, TABLE_WD, DENSE_WD = 0.02, 0.1, 0.01
CLIP = 0.000001  # puts clipped gradient elements near adam_eps (1e-8)
STEP = [
    "optim.lr_warmup_iters=0",
    "optim.lr_decay_style=constant",
    f"optim.weight_decay={DENSE_WD}",
    f"stem.optimizer.lr={TABLE_LR}",
    f"stem.optimizer.weight_decay={TABLE_WD}",
]


class OneStep:
    """A trainer built from `overrides`, its parameters before and after one train_step, and
    the gradients that step left: dense .grad, and each table's (ids, row gradient)."""

    def __init__(self, tiny_config, parallel, run_dir, *overrides: str):
        self.config = tiny_config(*STEP, f"logging.run_dir={run_dir}", *overrides)
        self.trainer = Trainer(self.config, parallel)
        (model,) = self.trainer.chunks
        self.tables = {name: t.weight for name, t in model.stem_tables().items()}
        table_ids = {id(w) for w in self.tables.values()}
        self.dense = {name: p for name, p in model.named_parameters() if id(p) not in table_ids}
        self.before = {
            name: p.detach().clone() for name, p in {**self.dense, **self.tables}.items()
        }
        self.metrics = self.trainer.train_step()
        self.dense_grads = {name: p.grad.detach().clone() for name, p in self.dense.items()}
        self.row_grads = {
            name: tuple(x.clone() for x in t.grad_accumulator.reduce())
            for name, t in model.stem_tables().items()
        }
        assert self.tables and all(w.grad is None for w in self.tables.values())  # row-sparse


def _squared(tensors) -> float:
    return sum(float(t.double().pow(2).sum()) for t in tensors)


def test_grad_norm_covers_dense_and_table_row_gradients(tiny_config, parallel, tmp_path):
    # At the default init std the tables hold ~1e-5 of the squared norm; at 0.1, ~1e-3.
    step = OneStep(
        tiny_config, parallel, tmp_path / "run", "optim.clip_grad=0", "model.init_method_std=0.1"
    )
    dense = _squared(step.dense_grads.values())
    tables = _squared(grad for _, grad in step.row_grads.values())
    reported = step.metrics["optim/grad_norm"]
    assert math.isclose(reported, math.sqrt(dense + tables), rel_tol=1e-6)
    # The tables' part, read off the reported norm (fp32: ~1e-7 of the whole) to 1%.
    assert math.isclose(reported**2 - dense, tables, rel_tol=1e-2)


def _dense_reference(step: OneStep, scale: float, lr: float) -> dict[str, torch.Tensor]:
    """torch's AdamW, one step from the parameters before, on the dense gradients x scale."""
    o = step.config.optim
    params = {
        name: p.clone().requires_grad_() for name, p in step.before.items() if name in step.dense
    }
    for name, p in params.items():
        p.grad = step.dense_grads[name] * scale
    # Megatron's rule: norms and biases are not decayed.
    no_decay = [p for n, p in params.items() if p.ndim == 1 or n.endswith(".bias")]
    decay = [p for p in params.values() if all(p is not q for q in no_decay)]
    torch.optim.AdamW(
        [{"params": decay, "weight_decay": DENSE_WD}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_eps,
    ).step()
    return {name: p.detach() for name, p in params.items()}


def _table_reference(step: OneStep, scale: float, lr: float, wd: float) -> dict[str, torch.Tensor]:
    """SparseRowAdamW (torch reference kernel), one step from the tables before, on the
    recorded row gradients x scale."""
    o = step.config.optim
    tables = {name: torch.nn.Parameter(step.before[name].clone()) for name in step.tables}
    SparseRowAdamW(
        tables,
        lr=lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_eps,
        weight_decay=wd,
        kernel="torch",
    ).step({name: (ids, grad * scale) for name, (ids, grad) in step.row_grads.items()})
    return {name: t.detach() for name, t in tables.items()}


def _close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.allclose(actual[n], expected[n], rtol=1e-5, atol=1e-7) for n in expected)


def test_clipping_scales_dense_and_table_updates_and_tables_use_their_own_lr_and_wd(
    tiny_config, parallel, tmp_path
):
    raw = OneStep(tiny_config, parallel, tmp_path / "raw", "optim.clip_grad=0")
    clipped = OneStep(tiny_config, parallel, tmp_path / "clipped", f"optim.clip_grad={CLIP}")
    norm = raw.metrics["optim/grad_norm"]
    assert clipped.metrics["optim/grad_norm"] == norm  # same seed, same batch: same gradient
    assert norm > 1e3 * CLIP
    scale = CLIP / norm
    after = {name: p.detach() for name, p in {**clipped.dense, **clipped.tables}.items()}
    dense_lr = clipped.config.optim.lr
    assert clipped.metrics["optim/lr"] == dense_lr and dense_lr != TABLE_LR

    assert _close(after, _dense_reference(raw, scale, dense_lr))
    assert not _close(after, _dense_reference(raw, 1.0, dense_lr))  # the unclipped update

    assert _close(after, _table_reference(raw, scale, TABLE_LR, TABLE_WD))
    for wrong in (
        _table_reference(raw, 1.0, TABLE_LR, TABLE_WD),  # tables left unclipped
        _table_reference(raw, scale, dense_lr, TABLE_WD),  # the dense lr
        _table_reference(raw, scale, TABLE_LR, DENSE_WD),
    ):  # the dense weight decay
        assert not _close(after, wrong)
    # Rows without a gradient did not move (lazy mode).
    for name, (ids, _) in raw.row_grads.items():
        idle = torch.ones(after[name].shape[0], dtype=torch.bool)
        idle[ids] = False
        assert idle.any() and torch.equal(after[name][idle], raw.before[name][idle])


def test_dense_optimizer_is_megatron_cores_of_the_configured_kind(tiny_config, parallel):
    """fp32: AdamW on the parameters; bf16: on fp32 main copies of bf16 parameters (tables
    stay fp32, outside); distributed: fp32 main shards. No table in any of them."""
    from megatron.core.optimizer import DistributedOptimizer, FP32Optimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    cases = [
        ((), FP32Optimizer, torch.float32),
        (("train.bf16=true",), Float16OptimizerWithFloat16Params, torch.bfloat16),
        (("optim.use_distributed_optimizer=true",), DistributedOptimizer, torch.float32),
    ]
    for overrides, kind, dense_dtype in cases:
        trainer = Trainer(tiny_config(*overrides), parallel)
        (dense,) = trainer.optimizer.parts
        assert isinstance(dense, kind), overrides
        stepped = [p for group in dense.optimizer.param_groups for p in group["params"]]
        assert stepped and all(p.dtype == torch.float32 for p in stepped), overrides
        tables = {id(t.weight) for t in trainer.tables.tables.values()}
        assert tables and not tables & {id(p) for p in stepped}
        for name, param in trainer.chunks[0].named_parameters():
            expected = torch.float32 if id(param) in tables else dense_dtype
            assert param.dtype == expected, (overrides, name)
