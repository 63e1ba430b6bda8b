"""A training process's environment, settled once at start-up before CUDA initialises: its
CPU threads, CUDA_DEVICE_MAX_CONNECTIONS, and the torch/megatron-core versions on a GPU.

Threads. torchrun sets OMP_NUM_THREADS=1 when it is unset and it starts more than one process
per node (with a warning), and torch takes its intra-op thread count from it, so the host-table
update and the prefetch gathers would run on one core. Each rank instead gets the cores it may
run on (sched_getaffinity) divided by the ranks of its node (LOCAL_WORLD_SIZE), unless the user
chose OMP_NUM_THREADS. A worker cannot tell torchrun's 1 from a user's 1, so
launch/torchrun.sh records the user's value (empty: unset) in STEM_USER_OMP_NUM_THREADS before
torchrun runs; without that record (a bare torchrun), a 1 under torchrun with several local
ranks is taken for torchrun's default, the one case where torchrun writes it.

CUDA_DEVICE_MAX_CONNECTIONS=1: with tensor parallelism megatron-core's linears launch their
TP all-gather / reduce-scatter before the weight-gradient GEMM and rely on one hardware queue
to run them in that order, overlapping the two (tensor_parallel/layers.py); Megatron-LM refuses
TP without it (training/arguments.py). It is read when the CUDA context is created.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from packaging.version import Version

USER_THREADS_VAR = "STEM_USER_OMP_NUM_THREADS"  # written by launch/torchrun.sh
MAX_CONNECTIONS_VAR = "CUDA_DEVICE_MAX_CONNECTIONS"
# (lowest, newest tested release line): the lowest are pyproject.toml's lower bounds (make
# test-lowest runs the suite on them); the newest is the line constraints.txt / the
# Makefile's TORCH_INSTALL hold.
TESTED = {"torch": ("2.6.0", "2.13"), "megatron-core": ("0.16.1", "0.16")}


@dataclass(frozen=True)
class Threads:
    count: int
    why: str  # for the start-up line


def _positive(name: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a whole number of threads >= 1, got {value!r}")
    return int(value)


def user_threads(env: Mapping[str, str]) -> int | None:
    """OMP_NUM_THREADS as the user set it, or None where it is unset or torchrun's default."""
    if USER_THREADS_VAR in env:  # launch/torchrun.sh saw the environment before torchrun
        value = env[USER_THREADS_VAR]
        return _positive("OMP_NUM_THREADS", value) if value else None
    value = env.get("OMP_NUM_THREADS", "")
    if not value:
        return None
    under_torchrun = "TORCHELASTIC_RUN_ID" in env
    if value == "1" and under_torchrun and int(env.get("LOCAL_WORLD_SIZE", "1")) > 1:
        return None
    return _positive("OMP_NUM_THREADS", value)


def threads_per_rank(env: Mapping[str, str], cores: int) -> Threads:
    """This rank's intra-op threads: the user's OMP_NUM_THREADS, else `cores` (the node's
    cores this process may use) shared by the node's local ranks."""
    chosen = user_threads(env)
    if chosen is not None:
        return Threads(chosen, "OMP_NUM_THREADS")
    local = _positive("LOCAL_WORLD_SIZE", env.get("LOCAL_WORLD_SIZE", "1") or "1")
    return Threads(max(1, cores // local), f"{cores} cores / {local} local ranks")


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_max_connections(tp_size: int, env: MutableMapping[str, str]) -> str | None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 under TP where unset; a warning where the user set
    another value (theirs is kept)."""
    if tp_size == 1:
        return None
    value = env.get(MAX_CONNECTIONS_VAR)
    if value is None:
        env[MAX_CONNECTIONS_VAR] = "1"
        return None
    if value != "1":
        return (
            f"warning: {MAX_CONNECTIONS_VAR}={value} with tensor parallelism: megatron-core "
            f"overlaps TP communication with the weight-gradient GEMM only with "
            f"{MAX_CONNECTIONS_VAR}=1 (unset it and this run sets it)"
        )
    return None


def version_problem(package: str, installed: str) -> tuple[bool, str] | None:
    """(fatal, message) for a version outside TESTED: below the lowest is refused (the code
    uses what that release added), a newer release line than the newest tested warns."""
    lowest, newest = TESTED[package]
    version = Version(installed)
    if version < Version(lowest):
        return True, (
            f"{package} {installed} is older than {lowest}, the lowest stem_megatron supports "
            f"(pyproject.toml): pip install '{package}>={lowest}'"
        )
    if version.release[:2] > Version(newest).release[:2]:
        return False, (
            f"warning: {package} {installed} is newer than the versions stem_megatron is tested "
            f"with ({lowest} to {newest}.x); if training misbehaves, install those "
            f"(constraints.txt)"
        )
    return None


def check_gpu_versions(installed: Mapping[str, str]) -> list[str]:
    """Warnings for `installed` ({package: version}); raises RuntimeError naming every refused
    one. On CPU parallel/cpu_compat.py requires its one megatron-core version instead."""
    problems = [version_problem(name, v) for name, v in installed.items()]
    fatal = [message for bad, message in filter(None, problems) if bad]
    if fatal:
        raise RuntimeError("; ".join(fatal))
    return [message for _, message in filter(None, problems)]


def settle(tp_size: int) -> tuple[Threads, list[str]]:
    """Apply the above to this process: torch's intra-op threads, CUDA_DEVICE_MAX_CONNECTIONS
    (before anything creates a CUDA context), and on a GPU the version check. Returns the
    threads and the warnings to print."""
    import torch

    threads = threads_per_rank(os.environ, available_cores())
    torch.set_num_threads(threads.count)
    # The row kernel's own OpenMP runtime (stem/csrc) reads it when the kernel loads.
    os.environ["OMP_NUM_THREADS"] = str(threads.count)
    warnings = [w for w in [set_max_connections(tp_size, os.environ)] if w]
    if torch.cuda.is_available():
        from stem_megatron.parallel.cpu_compat import megatron_core_version

        installed = {
            "torch": torch.__version__.split("+")[0],
            "megatron-core": megatron_core_version(),
        }
        warnings += check_gpu_versions(installed)
    return threads, warnings
