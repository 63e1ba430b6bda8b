"""Shared by the launch tests: the tiny run every launcher trains, its single-process
reference losses, and a process scope that is cleaned up whatever happens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.launch.processes import ProcessScope

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN_SH = str(ROOT / "launch/torchrun.sh")
CONFIG = str(ROOT / "configs/tiny.yaml")
TRAIN_ITERS = 10
RTOL = 1e-5  # equal up to fp32 summation order (see tests/parallel/test_equivalence.py)


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a real SLURM cluster (`make test-slurm`)")


@pytest.fixture
def scope(tmp_path):
    processes = ProcessScope(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture(scope="session")
def run_overrides(small_corpus) -> list[str]:
    """A 2-layer model at seq 32 saving every 2 steps; adam_eps 1e-5 keeps DP=2 within
    rounding of the single process. Options come last (train.py takes positionals first)."""
    return [
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.ffn_hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.seq_length=32",
        "model.make_vocab_size_divisible_by=64",
        "stem.layers=[1]",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        f"train.train_iters={TRAIN_ITERS}",
        "train.eval_interval=0",
        "train.eval_iters=1",
        "optim.lr_warmup_iters=2",
        "optim.lr=0.003",
        "optim.min_lr=0.0003",
        "optim.adam_eps=1e-5",
        "logging.log_interval=1",
        "checkpoint.save_interval=2",
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
    ]


def train_command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [*overrides, f"logging.run_dir={run_dir}", "--sample-prompt", ""]


def train_losses(run_dir: Path) -> dict[int, float]:
    """loss/train per step from metrics.jsonl; a step logged twice is an error."""
    losses: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/train" in record:
            assert record["step"] not in losses, f"step {record['step']} logged twice"
            losses[record["step"]] = record["loss/train"]
    return losses


def single_process_losses(
    overrides: list[str], tmp: Path, iters: int = TRAIN_ITERS
) -> dict[int, float]:
    """loss/train per step of the run `overrides` describe, as one plain process."""
    processes = ProcessScope(tmp)
    try:
        code, out = processes.run(
            [
                sys.executable,
                "-m",
                "stem_megatron.train",
                "--config",
                CONFIG,
                *train_command(tmp / "run", overrides),
            ],
            "reference",
            timeout=120,
            cwd=ROOT,
        )
    finally:
        processes.close()
    assert code == 0, out
    losses = train_losses(tmp / "run")
    assert sorted(losses) == list(range(1, iters + 1))
    return losses


@pytest.fixture(scope="session")
def reference_losses(run_overrides, tmp_path_factory) -> dict[int, float]:
    """The same run as one plain process (no torchrun)."""
    return single_process_losses(run_overrides, tmp_path_factory.mktemp("reference"))


def assert_trained_like_reference(
    run_dir: Path, reference: dict[int, float], signal_saves: tuple[int, ...] = ()
) -> None:
    """Every step's loss equals the single process's; checkpoints every 2 steps (plus any a
    stop signal made the run save in between) and a `latest` pointing at the last."""
    losses = train_losses(run_dir)
    assert sorted(losses) == sorted(reference)
    for step, loss in losses.items():
        assert abs(loss - reference[step]) <= RTOL * abs(reference[step]), (
            f"step {step}: loss {loss} vs single process {reference[step]}"
        )
    iters = max(reference)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == sorted(
        {f"step_{s}" for s in range(2, iters + 1, 2)} | {f"step_{s}" for s in signal_saves}
    )
    assert (checkpoints / "latest").read_text().strip() == f"step_{iters}"
