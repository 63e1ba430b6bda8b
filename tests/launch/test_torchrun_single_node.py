"""launch/torchrun.sh on one node: DP=2 under real torchrun trains like one process, and
bad arguments or a failing run give a usage message or a non-zero exit code."""

from __future__ import annotations

import sys

import pytest

from tests.launch.conftest import CONFIG, TORCHRUN_SH, assert_trained_like_reference, train_command


def test_two_processes_train_like_one(scope, tmp_path, run_overrides, reference_losses):
    code, out = scope.run(
        [TORCHRUN_SH, "2", CONFIG, *train_command(tmp_path / "run", run_overrides)],
        "torchrun",
        timeout=150,
    )
    assert code == 0, out
    assert_trained_like_reference(tmp_path / "run", reference_losses)
    assert (tmp_path / "run/tb").is_dir()


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "expected NPROC and CONFIG"),
        (["two", CONFIG], "NPROC must be a positive integer"),
        (["2", "configs/missing.yaml"], "config file not found"),
    ],
)
def test_bad_arguments_print_usage(scope, args, message):
    code, out = scope.run([TORCHRUN_SH, *args], "usage", timeout=10)
    assert code == 2
    assert message in out and "usage: launch/torchrun.sh NPROC CONFIG" in out


def test_multi_node_without_endpoint_is_refused(scope):
    code, out = scope.run(
        [TORCHRUN_SH, "1", CONFIG], "usage", timeout=10, env=scope.env(NNODES="2")
    )
    assert code == 2 and "NNODES=2 needs RDZV_ENDPOINT" in out


def test_interpreter_without_torch_is_refused(scope, tmp_path):
    # The Makefile once exported its own PYTHON (the system python3) into the tests, and the
    # launcher ran the workers under it: a traceback about torch, not a message.
    no_torch = tmp_path / "python"
    no_torch.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    no_torch.chmod(0o755)
    code, out = scope.run(
        [TORCHRUN_SH, "1", CONFIG], "usage", timeout=10, env=scope.env(PYTHON=str(no_torch))
    )
    assert code == 2
    assert f"interpreter '{no_torch}' cannot import torch: set PYTHON" in out, out


def test_failing_run_exits_non_zero(scope, tmp_path, run_overrides):
    code, out = scope.run(
        [
            TORCHRUN_SH,
            "1",
            CONFIG,
            "train.train_iter=3",
            *train_command(tmp_path / "run", run_overrides),
        ],
        "torchrun",
        timeout=60,
    )
    assert code != 0
    assert "unknown key 'train.train_iter'" in out


def test_world_that_does_not_fit_the_layout_is_one_line_per_rank(scope, tmp_path, run_overrides):
    # 3 layers split into PP=3 stages (a layout the config accepts), but not over 2 ranks.
    code, out = scope.run(
        [
            TORCHRUN_SH,
            "2",
            CONFIG,
            "parallel.pipeline_model_parallel_size=3",
            *train_command(tmp_path / "run", [*run_overrides, "model.num_layers=3"]),
        ],
        "torchrun",
        timeout=60,
    )
    assert code != 0
    assert (
        "error: world size 2 is not divisible by tensor_model_parallel_size (1) x "
        "pipeline_model_parallel_size (3)" in out
    )
    assert "Traceback" not in out  # neither the workers nor the agent
    assert "error: stem_megatron.train failed: rank" in out
