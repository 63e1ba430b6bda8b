"""A save killed with SIGKILL leaves the previous checkpoint and `latest` intact.

A child process (from a forkserver that has torch imported: a fresh interpreter per
case would cost seconds; a plain fork of the test process can deadlock in OpenMP) saves
step 1, then starts saving step 2 with one OS call patched to announce itself and hang:
the first fsync (DCP is writing shards), our commit's os.rename of the tmp dir (complete
but uncommitted; DCP's own earlier rename of its `.metadata` passes through), or
os.replace (step_2 is committed, `latest` is not yet moved). The parent SIGKILLs it
there, then checks what a restarted run sees: a resume (recover_strays, then load)
continues from step 1, or from step 2 once it is committed and verified.
"""

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from stem_megatron.checkpoint.dcp import Checkpointer, resolve


def _child(root: Path, hang_in: str) -> None:
    ckpt = Checkpointer(root)
    ckpt.save(1, {"w": torch.full((4,), 1.0), "big": torch.zeros(1 << 20)}, {"step": 1})

    original = getattr(os, hang_in)

    def hang(*args: object, **kwargs: object) -> object:
        if hang_in == "rename" and not Path(args[0]).name.startswith(".tmp_step_"):
            return original(*args, **kwargs)  # DCP's rename of its .metadata, not our commit
        (root.parent / "child_hanging").touch()
        time.sleep(600)
        return None

    setattr(os, hang_in, hang)
    ckpt.save(2, {"w": torch.full((4,), 2.0), "big": torch.ones(1 << 20)}, {"step": 2})


def _kill_mid_save(root: Path, hang_in: str) -> None:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "stem_megatron.checkpoint.dcp"])
    child = ctx.Process(target=_child, args=(root, hang_in))
    child.start()
    flag = root.parent / "child_hanging"
    deadline = time.monotonic() + 30
    try:
        while not flag.exists():
            if child.exitcode is not None:
                pytest.fail(f"child exited ({child.exitcode}) before reaching os.{hang_in}")
            if time.monotonic() > deadline:
                pytest.fail(f"child never reached os.{hang_in}")
            time.sleep(0.01)
    finally:
        child.kill()  # SIGKILL: no cleanup handlers run, as in a node failure
        child.join()
    assert child.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("hang_in", ["fsync", "rename", "replace"])
def test_killed_save_keeps_previous_checkpoint(tmp_path: Path, hang_in: str) -> None:
    root = tmp_path / "checkpoints"
    _kill_mid_save(root, hang_in)

    assert (root / "latest").read_text().strip() == "step_1"
    assert resolve(tmp_path) == root / "step_1"
    stale = sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp_"))
    committed = hang_in == "replace"
    if committed:
        assert (root / "step_2").is_dir() and [s[:12] for s in stale] == [".tmp_latest_"]
    else:
        assert not (root / "step_2").exists() and [s[:12] for s in stale] == [".tmp_step_2_"]
    if hang_in == "rename":  # killed in our commit: the save was complete, manifest included
        assert (root / stale[0] / "manifest.json").is_file()

    ckpt = Checkpointer(root)  # a requeued run resuming with checkpoint.load=auto
    lines = ckpt.recover_strays()
    assert [line.split(":")[0] for line in lines] == (
        [f"adopted {root / 'step_2'}"] if committed else []
    )
    state = {"w": torch.zeros(4), "big": torch.full((1 << 20,), 7.0)}
    step = 2 if committed else 1
    assert ckpt.load(tmp_path, state) == {"step": step}
    assert torch.equal(state["w"], torch.full((4,), float(step)))
    assert torch.equal(state["big"], torch.full((1 << 20,), float(step - 1)))

    ckpt.save(3, {"w": torch.full((4,), 3.0), "big": torch.zeros(1 << 20)}, {"step": 3})
    assert (root / "latest").read_text().strip() == "step_3"
    assert not any(p.name.startswith(".tmp_") for p in root.iterdir())
    assert ckpt.load(tmp_path, state) == {"step": 3}
    assert torch.equal(state["w"], torch.full((4,), 3.0))
