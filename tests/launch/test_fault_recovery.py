"""A worker SIGKILLed mid-run under `MAX_RESTARTS=1 launch/torchrun.sh`: torchrun restarts
the worker group, which resumes from the latest checkpoint (checkpoint.load=auto) and ends
with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import time

from tests.launch.conftest import (
    CONFIG,
    TORCHRUN_SH,
    TRAIN_ITERS,
    assert_trained_like_reference,
    train_command,
)
from tests.launch.processes import children, environ_of, output


def wait_for_step(metrics, step: int, agent, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and agent.poll() is None:
        if metrics.exists() and any(
            json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines()
        ):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never logged; output:\n{output(agent)[-3000:]}")


def test_killed_worker_is_restarted_and_resumes_from_latest(
    scope, tmp_path, run_overrides, reference_losses
):
    run = tmp_path / "run"
    agent = scope.start(
        [TORCHRUN_SH, "2", CONFIG, *train_command(run, run_overrides)],
        "torchrun",
        env=scope.env(MAX_RESTARTS="1"),
    )
    wait_for_step(run / "metrics.jsonl", 3, agent, timeout=150)
    # Freeze both workers, so the checkpoint they will resume from is known, then kill
    # rank 1. (launch/torchrun.sh execs torchrun: the agent is the process we started.)
    workers = {int(environ_of(pid)["RANK"]): pid for pid in children(agent.pid)}
    assert sorted(workers) == [0, 1], workers
    for pid in workers.values():
        os.kill(pid, signal.SIGSTOP)
    resume_from = int((run / "checkpoints/latest").read_text().strip().removeprefix("step_"))
    os.kill(workers[1], signal.SIGKILL)
    os.kill(workers[0], signal.SIGCONT)

    code = scope.wait(agent, timeout=150)
    out = output(agent)
    assert code == 0, out
    starts = out.split("model: ")  # rank 0 prints the model line on every (re)start
    assert len(starts) == 3, f"expected one restart; output:\n{out}"
    resumed_steps = [
        int(s) for s in re.findall(rf"^step\s+(\d+)/{TRAIN_ITERS} ", starts[2], re.MULTILINE)
    ]
    assert resumed_steps[0] == resume_from + 1, out
    assert_trained_like_reference(run, reference_losses)
