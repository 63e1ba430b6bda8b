"""launch/slurm.sbatch on a real SLURM cluster (one node on localhost): a 2-process job
trains like one process and checkpoints; a requeued job resumes from `latest`; and
`srun python -m stem_megatron.train` without torchrun (ranks from SLURM_PROCID/SLURM_NTASKS)
trains too. Run with `make test-slurm` (installs slurm-wlm and munge from Debian if needed).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys

import pytest

from stem_megatron.parallel.local_workers import free_port
from tests.launch.conftest import (
    CONFIG,
    ROOT,
    assert_trained_like_reference,
    single_process_losses,
    train_command,
)
from tests.launch.processes import environ_of
from tests.launch.slurm_cluster import SlurmCluster, install

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
SBATCH = str(ROOT / "launch/slurm.sbatch")
JOB_TIMEOUT = 240
# The requeued run: long enough that the requeue's SIGTERM reaches the unfrozen workers before
# they could finish (10 steps of the tiny model take well under a second).
REQUEUE_ITERS = 60


@pytest.fixture(scope="module")
def long_run(run_overrides, tmp_path_factory) -> tuple[list[str], dict[int, float]]:
    """(overrides, single-process losses) of the requeued run."""
    overrides = run_overrides + [f"train.train_iters={REQUEUE_ITERS}"]
    return overrides, single_process_losses(
        overrides, tmp_path_factory.mktemp("long"), REQUEUE_ITERS
    )


@pytest.fixture(scope="module")
def cluster():
    reason = install()
    if reason:
        pytest.skip(f"no SLURM: {reason}")
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def finished(cluster, job_id: str, out) -> dict[str, str]:
    info = cluster.wait_state(
        job_id,
        {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"},
        JOB_TIMEOUT,
    )
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"{info}\n{out.read_text() if out.exists() else 'no job output'}\n{cluster.logs()}"
    )
    return info


def test_sbatch_two_processes_train_and_checkpoint(
    cluster, tmp_path, run_overrides, reference_losses
):
    out = tmp_path / "job.out"
    job_id = cluster.sbatch(
        ["--output", str(out), SBATCH, CONFIG, *train_command(tmp_path / "run", run_overrides)],
        env={"GPUS_PER_NODE": "2", "RDZV_PORT": str(free_port())},
        cwd=ROOT,
    )
    finished(cluster, job_id, out)
    text = out.read_text()
    assert f"job {job_id} restart 0: 1 node(s) x 2 process(es)" in text, text
    assert_trained_like_reference(tmp_path / "run", reference_losses)


def test_requeued_job_resumes_from_latest(cluster, tmp_path, long_run):
    """Config and overrides from the environment this time. The workers are frozen once
    step 3 is logged, so the requeue (SIGCONT + SIGTERM, SIGKILL after KillWait 5 s) lands
    mid-run whatever the machine's speed; the requeued job must resume from a checkpoint
    saved no earlier than the freeze, and redo nothing before it."""
    run_overrides, reference_losses = long_run
    run, out = tmp_path / "run", tmp_path / "job.out"
    overrides = train_command(run, run_overrides)[:-2]  # OVERRIDES cannot carry an empty arg
    job_id = cluster.sbatch(
        ["--output", str(out), SBATCH],
        env={
            "CONFIG": CONFIG,
            "OVERRIDES": " ".join(overrides),
            "GPUS_PER_NODE": "2",
            "RDZV_PORT": str(free_port()),
        },
        cwd=ROOT,
    )
    metrics = run / "metrics.jsonl"
    cluster.until(
        lambda: (
            metrics.exists()
            and any(
                json.loads(line).get("step", 0) >= 3 for line in metrics.read_text().splitlines()
            )
        ),
        JOB_TIMEOUT,
        f"step 3 of job {job_id}\n{out.read_text() if out.exists() else ''}",
    )
    workers = [pid for pid in cluster.scope.tagged() if "TORCHELASTIC_RUN_ID" in environ_of(pid)]
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    frozen_at = int((run / "checkpoints/latest").read_text().strip().removeprefix("step_"))
    # SLURM sends SIGCONT just before SIGTERM: the workers may still save one more checkpoint,
    # at the next interval or, stopping on the signal, at the step they are in.
    cluster.run(["scontrol", "requeue", job_id])

    info = finished(cluster, job_id, out)
    assert info["Restarts"] == "1", info
    text = out.read_text()
    assert f"job {job_id} restart 0:" in text and f"job {job_id} restart 1:" in text, text
    second = text.split(f"job {job_id} restart 1:")[1]
    resumed = [int(s) for s in re.findall(rf"^step\s+(\d+)/{REQUEUE_ITERS} ", second, re.MULTILINE)]
    assert resumed and frozen_at <= resumed[0] - 1 < REQUEUE_ITERS, text
    assert resumed == list(range(resumed[0], REQUEUE_ITERS + 1)), text
    start = resumed[0] - 1
    assert_trained_like_reference(run, reference_losses, signal_saves=(start,) if start % 2 else ())


def test_srun_without_torchrun_uses_slurm_ranks(cluster, tmp_path, run_overrides, reference_losses):
    """docs/launching.md's torchrun-free form: one task per process, MASTER_ADDR/PORT set by the
    script, RANK/WORLD_SIZE absent so ParallelState reads SLURM_PROCID/SLURM_NTASKS."""
    out = tmp_path / "job.out"
    args = " ".join(shlex.quote(a) for a in train_command(tmp_path / "run", run_overrides))
    script = (
        f'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
        f"MASTER_PORT={free_port()}; "
        f"srun {sys.executable} -m stem_megatron.train --config {CONFIG} {args}"
    )
    job_id = cluster.sbatch(["--ntasks", "2", "--output", str(out), "--wrap", script], cwd=ROOT)
    finished(cluster, job_id, out)
    assert_trained_like_reference(tmp_path / "run", reference_losses)
