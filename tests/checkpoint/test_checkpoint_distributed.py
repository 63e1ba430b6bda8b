"""Two gloo ranks save and load one checkpoint; errors on one rank reach both.

Each rank holds its own tensors and scalars under rank-named keys, a replicated
tensor and scalar under shared keys, and a STEM-like table as a DTensor sharded by
rows that is loaded back sharded by columns, and by one process as a plain tensor. Workers
come from a forkserver with torch preloaded (a fresh interpreter per rank costs seconds of
imports).
"""

import json
import multiprocessing
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.checkpoint.errors import CheckpointExistsError, CheckpointMismatchError
from stem_megatron.checkpoint.safe_io import read_dcp_metadata

WORLD = 2
TABLE = torch.arange(24.0).reshape(4, 6)


def _state(rank: int, filled: bool) -> dict:
    torch.manual_seed(100 + rank)
    rng = torch.get_rng_state()
    table = torch.full((rank + 2, 3), float(rank + 1))
    shared = torch.arange(6.0).reshape(2, 3)
    return {
        "model": {
            "shared.weight": shared if filled else torch.zeros(2, 3),
            f"rank{rank}.table": table if filled else torch.zeros_like(table),
        },
        "rng": {f"rank{rank}": rng if filled else torch.zeros_like(rng)},
        "sparse": {
            f"rank{rank}.last_settled": 10 + rank if filled else 0,
            "lr": 0.5 if filled else 0.0,
        },
    }


def _worker(rank: int, root: Path, init_file: Path) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        ckpt = Checkpointer(root)
        saved = _state(rank, filled=True)
        assert ckpt.save(1, saved, {"step": 1, "world_size": WORLD}) == root / "step_1"

        loaded = _state(rank, filled=False)
        assert ckpt.load(root, loaded) == {"step": 1, "world_size": WORLD}
        for group in ("model", "rng"):
            for key, value in saved[group].items():
                assert torch.equal(loaded[group][key], value), (rank, key)
        assert loaded["sparse"] == saved["sparse"]

        mesh = init_device_mesh("cpu", (WORLD,))
        ckpt.save(2, {"table": distribute_tensor(TABLE, mesh, [Shard(0)])}, {"step": 2})
        by_columns = {"table": distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)])}
        ckpt.load(root / "step_2", by_columns)
        assert by_columns["table"].to_local().shape == (4, 3)
        assert torch.equal(by_columns["table"].full_tensor(), TABLE)

        # A shape error on rank 1 alone must stop rank 0 too (else it would hang in DCP).
        wrong = _state(rank, filled=False)
        if rank == 1:
            wrong["model"]["rank1.table"] = torch.zeros(5, 3)
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.load(root / "step_1", wrong)
        assert (info.value.key, info.value.checkpoint_shape, info.value.expected_shape) == (
            "model.rank1.table",
            (3, 3),
            (5, 3),
        )

        # A shared key with per-rank values is refused on every rank, before writing.
        conflicting = _state(rank, filled=True)
        conflicting["sparse"]["lr"] = 0.1 * (rank + 1)
        with pytest.raises(ValueError, match="'sparse.lr'"):
            ckpt.save(3, conflicting, {"step": 3})
        # Only rank 0 sees step_1 exists; rank 1 must raise as well.
        with pytest.raises(CheckpointExistsError):
            ckpt.save(1, saved, {"step": 1})
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(root: Path, init_file: Path, timeout_s: float = 60) -> None:
    multiprocessing.set_forkserver_preload(["torch", "stem_megatron.checkpoint.dcp"])
    ctx = tmp.start_processes(
        _worker, args=(root, init_file), nprocs=WORLD, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail("distributed checkpoint workers hung")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def test_two_ranks_save_load_and_fail_together(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _run(root, tmp_path / "pg_init")

    # Committed once, by rank 0, with both ranks' shards and the replicated key once.
    assert (root / "latest").read_text().strip() == "step_2"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1", "step_2"]
    step = root / "step_1"
    assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    tensors = read_dcp_metadata(step).state_dict_metadata
    assert sorted(tensors) == [
        "model.rank0.table",
        "model.rank1.table",
        "model.shared.weight",
        "rng.rank0",
        "rng.rank1",
    ]
    assert len(tensors["model.shared.weight"].chunks) == 1
    assert json.loads((step / "scalars.json").read_text()) == {
        "sparse.rank0.last_settled": 10,
        "sparse.lr": 0.5,
        "sparse.rank1.last_settled": 11,
    }

    # One process can load what two ranks wrote.
    both = _state(0, filled=False)
    one = _state(1, filled=False)
    for group in both:
        both[group].update(one[group])
    Checkpointer(root).load(root / "step_1", both)
    assert torch.equal(both["model"]["rank1.table"], torch.full((3, 3), 2.0))
    assert torch.equal(both["model"]["shared.weight"], torch.arange(6.0).reshape(2, 3))
    assert both["sparse"] == {"rank0.last_settled": 10, "lr": 0.5, "rank1.last_settled": 11}
    torch.manual_seed(101)
    assert torch.equal(both["rng"]["rank1"], torch.get_rng_state())
    table = {"table": torch.zeros(4, 6)}
    Checkpointer(root).load(root / "step_2", table)
    assert torch.equal(table["table"], TABLE)
