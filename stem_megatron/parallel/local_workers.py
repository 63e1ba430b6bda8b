"""Run a function on N local processes joined by gloo on the CPU, the way torchrun starts them
(RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), and collect each rank's result: how
tests, benchmarks and offline tools run parallel layouts on one machine."""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
import warnings

import torch
import torch.multiprocessing as mp

from stem_megatron.parallel.state import DEVICE_VAR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun would set, and the CPU as the device: the workers join by gloo however
    many GPUs the host has (parallel/state.py choose_device)."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        DEVICE_VAR: "cpu",
    }


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(worker_env(rank, world, port))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # N processes share 2 cores
    try:
        # As bytes: tensors sent through the queue would live in shared memory that
        # disappears when this process exits before the parent reads them.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # the parent reports it
        queue.put((rank, False, traceback.format_exc()))


def run_local_workers(world: int, fn, *args, timeout: float = 300.0) -> list:
    """fn(*args) on `world` processes; returns the results in rank order. A failure or a
    hang on any rank fails with that rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, fn, args, queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world and time.monotonic() < deadline:
        if queue.empty():
            if not any(p.is_alive() for p in procs):
                break
            time.sleep(0.05)
            continue
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = torch.load(io.BytesIO(payload), weights_only=True)
        else:
            errors.append(f"rank {rank}:\n{payload}")
            break
    for p in procs:
        p.join(timeout=5 if not errors else 1)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("worker failed:\n" + "\n".join(errors))
    if len(results) < world:
        raise AssertionError(f"only ranks {sorted(results)} of {world} finished within {timeout} s")
    return [results[r] for r in range(world)]
