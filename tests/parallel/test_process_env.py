"""A training process's start-up environment (parallel/process_env.py): threads per rank
under torchrun, the launcher's record of the user's OMP_NUM_THREADS,
CUDA_DEVICE_MAX_CONNECTIONS under TP, and the version range on a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stem_megatron.parallel import process_env
from stem_megatron.parallel.process_env import (
    check_gpu_versions,
    set_max_connections,
    threads_per_rank,
    user_threads,
)

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4"}


def test_torchruns_default_is_replaced_by_cores_per_local_rank() -> None:
    # torchrun with 4 local ranks wrote OMP_NUM_THREADS=1 itself: 32 cores -> 8 each
    assert threads_per_rank({**TORCHRUN, "OMP_NUM_THREADS": "1"}, 32).count == 8
    assert threads_per_rank(TORCHRUN, 32).count == 8
    assert threads_per_rank(TORCHRUN, 3).count == 1  # never 0
    assert threads_per_rank({}, 6).count == 6  # one process: all its cores


def test_the_users_choice_is_kept() -> None:
    assert threads_per_rank({**TORCHRUN, "OMP_NUM_THREADS": "3"}, 32).count == 3
    assert threads_per_rank({"OMP_NUM_THREADS": "1"}, 32).count == 1  # not under torchrun
    # launch/torchrun.sh's record decides, whatever torchrun wrote after it
    recorded = {**TORCHRUN, "OMP_NUM_THREADS": "1", process_env.USER_THREADS_VAR: "1"}
    assert user_threads(recorded) == 1
    assert user_threads({**recorded, process_env.USER_THREADS_VAR: ""}) is None
    with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a whole number"):
        user_threads({"OMP_NUM_THREADS": "many"})


def test_launcher_records_the_users_omp_num_threads(tmp_path: Path) -> None:
    """launch/torchrun.sh hands torchrun an environment saying what the user set: a PYTHON
    that runs the launcher's import checks and prints, instead of starting torchrun, what the
    workers would inherit."""
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/usr/bin/env bash\n[[ $1 == -c ]] && exec {sys.executable} "$@"\n'
        f'echo "user=${{{process_env.USER_THREADS_VAR}-absent}}"\n'
    )
    fake.chmod(0o755)
    config = ROOT / "configs" / "tiny.yaml"

    def recorded(**env: str) -> str:
        base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        out = subprocess.run(
            [str(ROOT / "launch" / "torchrun.sh"), "2", str(config)],
            env={**base, "PYTHON": str(fake), **env},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        return re.search(r"user=(\S*)", out).group(1)

    assert recorded() == ""
    assert recorded(OMP_NUM_THREADS="1") == "1"


def test_max_connections_under_tp() -> None:
    env: dict[str, str] = {}
    assert set_max_connections(1, env) is None and env == {}
    assert set_max_connections(2, env) is None
    assert env == {process_env.MAX_CONNECTIONS_VAR: "1"}
    env = {process_env.MAX_CONNECTIONS_VAR: "8"}
    assert "CUDA_DEVICE_MAX_CONNECTIONS=8 with tensor parallelism" in set_max_connections(2, env)
    assert env[process_env.MAX_CONNECTIONS_VAR] == "8"


def test_versions_outside_the_tested_range() -> None:
    assert check_gpu_versions({"torch": "2.13.0", "megatron-core": "0.16.1"}) == []
    (warning,) = check_gpu_versions({"torch": "2.14.1", "megatron-core": "0.16.3"})
    assert "torch 2.14.1 is newer" in warning and "2.6.0 to 2.13.x" in warning
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.15\.2 is older than 0\.16\.1"):
        check_gpu_versions({"torch": "2.13.0", "megatron-core": "0.15.2"})


def test_tested_range_follows_pyproject_and_constraints() -> None:
    """The lowest versions are pyproject.toml's lower bounds; the pinned megatron-core and
    the Makefile's torch lie in the range."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package, (lowest, _) in process_env.TESTED.items():
        assert f'"{package}>={lowest}"' in pyproject
    pinned = re.search(r"^megatron-core==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    torch_install = re.search(r"TORCH_INSTALL \?= torch==(\S+)", (ROOT / "Makefile").read_text())
    installed = {"megatron-core": pinned.group(1), "torch": torch_install.group(1)}
    assert check_gpu_versions(installed) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_start_up_under_tp(monkeypatch: pytest.MonkeyPatch) -> None:
    """settle() on a GPU: the installed versions pass, CUDA_DEVICE_MAX_CONNECTIONS is set for
    TP, and the threads follow the cores per local rank."""
    monkeypatch.delenv(process_env.MAX_CONNECTIONS_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    threads, _ = process_env.settle(2)  # raises for a version below the supported ones
    assert os.environ[process_env.MAX_CONNECTIONS_VAR] == "1"
    assert threads.count == torch.get_num_threads() == process_env.available_cores()
