"""Which device a process takes (parallel/state.py choose_device): on a GPU host a local
worker of an offline tool takes the CPU whatever its rank, while a launched rank takes its
GPU and a rank beyond the node's GPUs is refused in one line. CUDA's presence is stood in by
torch.cuda.is_available / device_count, the two calls the choice reads."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.parallel import state
from stem_megatron.parallel.local_workers import worker_env
from stem_megatron.parallel.state import choose_device


@pytest.fixture
def two_gpu_host(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv(state.DEVICE_VAR, raising=False)
    return monkeypatch


def test_launched_ranks_take_their_gpu(two_gpu_host: pytest.MonkeyPatch) -> None:
    assert choose_device(1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="local rank 2 has no GPU: this node has 2"):
        choose_device(2)


def test_local_workers_beyond_the_gpus_take_the_cpu(two_gpu_host: pytest.MonkeyPatch) -> None:
    """Resharding to 4 processes on a 2-GPU host: every worker, rank 3 included, is on the CPU
    (the gloo backend and megatron's CPU patches follow the device in ParallelState)."""
    for rank in range(4):
        for key, value in worker_env(rank, 4, 29500).items():
            two_gpu_host.setenv(key, value)
        assert choose_device(rank) == torch.device("cpu")


def test_without_cuda_everyone_is_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(state.DEVICE_VAR, raising=False)
    assert choose_device(5) == torch.device("cpu")
    monkeypatch.setenv(state.DEVICE_VAR, "gpu")
    with pytest.raises(ValueError, match="STEM_DEVICE must be 'cpu' or unset, got 'gpu'"):
        choose_device(0)


def _worker_device() -> str:
    from stem_megatron.parallel.state import ParallelState

    parallel = ParallelState.initialize()
    try:
        return str(parallel.device)
    finally:
        parallel.destroy()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_more_local_workers_than_gpus_run_on_the_cpu() -> None:
    """On a real GPU host: one more local worker than there are GPUs joins by gloo on the CPU
    (before the fix the last one failed with an invalid device ordinal)."""
    from stem_megatron.parallel.local_workers import run_local_workers

    world = torch.cuda.device_count() + 1
    assert run_local_workers(world, _worker_device, timeout=240) == ["cpu"] * world
