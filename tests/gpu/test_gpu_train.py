"""`make train`'s config (configs/tiny.yaml) on CUDA in bf16, a few steps: through the real
Trainer (where every parameter lives and in which dtype) and through `python -m
stem_megatron.train` (the command `make train` runs), on the small corpus."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from stem_megatron.config_loader import load_config
from stem_megatron.training.trainer import Trainer
from tests.benchmarks.test_benchmarks_smoke import small_data
from tests.training.test_trainer import metrics_by_step

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
SHORT = [
    "train.bf16=true",
    "optim.lr_warmup_iters=2",
    f"train.train_iters={STEPS}",
    "train.eval_interval=2",
    "train.eval_iters=1",
    "logging.log_interval=1",
]


def test_tiny_config_trains_on_cuda_in_bf16(small_corpus, parallel, tmp_path):
    import torch

    config = load_config(
        ROOT / "configs/tiny.yaml",
        [*SHORT, *small_data(small_corpus), f"logging.run_dir={tmp_path / 'run'}"],
    )
    trainer = Trainer(config, parallel)
    assert parallel.device.type == "cuda"
    tables = {id(t.weight) for t in trainer.tables.tables.values()}
    assert len(tables) == 3  # stem.layers [1, 3, 5]
    for name, param in trainer.chunks[0].named_parameters():
        assert param.device.type == "cuda", name
        # Tables keep fp32 rows (config.py, train.bf16); the dense matrices are bf16.
        if id(param) in tables:
            assert param.dtype == torch.float32, name
        elif param.dim() == 2:
            assert param.dtype == torch.bfloat16, name
    losses = [trainer.train_step()["loss/train"] for _ in range(STEPS)]
    assert all(math.isfinite(loss) for loss in losses), losses


def test_train_command_runs_on_cuda(small_corpus, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stem_megatron.train",
            "--config",
            "configs/tiny.yaml",
            *SHORT,
            f"checkpoint.save_interval={STEPS}",
            *small_data(small_corpus),
            f"logging.run_dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = metrics_by_step(run_dir)
    assert all(math.isfinite(metrics[s]["loss/train"]) for s in range(1, STEPS + 1))
    assert math.isfinite(metrics[STEPS]["loss/val"])
    assert (run_dir / "checkpoints" / f"step_{STEPS}").is_dir()
