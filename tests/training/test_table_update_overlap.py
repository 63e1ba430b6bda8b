"""Host-table updates overlapped with the backward (stem/overlap.py): bitwise the
same training as the update after the backward; started during the backward for every table
when allowed, never with gradient clipping."""

from __future__ import annotations

import torch

from stem_megatron.training.trainer import Trainer
from tests.training.test_trainer import metrics_by_step

STEPS = 12


def run(tiny_config, parallel, tmp_path, name: str, *overrides: str):
    config = tiny_config(
        "stem.storage=host",
        "stem.layers=[0,1]",
        f"train.train_iters={STEPS}",
        "train.eval_interval=6",
        f"logging.run_dir={tmp_path / name}",
        *overrides,
    )
    trainer = Trainer(config, parallel)
    trainer.run()
    params = {n: p.detach().clone() for n, p in trainer.chunks[0].named_parameters()}
    return metrics_by_step(config.run_dir), params, trainer.tables.overlap is not None


def test_overlapped_updates_equal_updates_after_the_backward(tiny_config, parallel, tmp_path):
    runs = {
        name: run(
            tiny_config,
            parallel,
            tmp_path,
            name,
            "optim.clip_grad=0",
            "stem.optimizer.mode=exact",
            f"stem.optimizer.overlap_update={on}",
        )
        for name, on in (("after", "false"), ("overlapped", "true"))
    }
    (after, after_params, after_on), (over, over_params, over_on) = (
        runs["after"],
        runs["overlapped"],
    )
    assert over_on and not after_on
    for step in range(1, STEPS + 1):
        assert over[step]["loss/train"] == after[step]["loss/train"], step
        assert over[step]["stem/overlapped_tables"] == 2  # both tables, every step
        assert after[step]["stem/overlapped_tables"] == 0
    assert over[STEPS]["loss/val"] == after[STEPS]["loss/val"]
    for name, value in after_params.items():
        assert torch.equal(over_params[name], value), name


def test_gradient_clipping_turns_the_overlap_off(tiny_config, parallel, tmp_path):
    metrics, _, on = run(
        tiny_config, parallel, tmp_path, "clipped", "optim.clip_grad=1.0", "train.train_iters=2"
    )
    assert not on and metrics[2]["stem/overlapped_tables"] == 0
