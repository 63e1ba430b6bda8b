"""A run whose checkpoints cannot be saved is refused before it trains, not after.

Before these checks, each case below trained the whole run and then lost it at the save:
a `checkpoint.save` that is a file (FileExistsError), a step dir the run will save already
there (CheckpointExistsError, on every requeue when it is a stray newer than `latest`), a
disk without room (a traceback from the zip writer, the tmp dir left filling the disk).
"""

import multiprocessing
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from stem_megatron.checkpoint.dcp import Checkpointer, resolve
from stem_megatron.checkpoint.errors import CheckpointExistsError, CheckpointSaveError
from stem_megatron.checkpoint.layout import read_json
from stem_megatron.training.trainer import Trainer


def test_save_dir_that_is_a_file_is_refused_before_training(tiny_config, parallel, tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("mine")
    with pytest.raises(CheckpointSaveError, match=f"cannot be saved to {target}: .* is a file"):
        Trainer(tiny_config(f"checkpoint.save={target}"), parallel)
    assert target.read_text() == "mine"


def test_a_step_the_run_will_save_already_taken_is_refused(tiny_config, parallel, tmp_path):
    Trainer(tiny_config("train.train_iters=4", "checkpoint.save_interval=2"), parallel).run()
    step_2 = tmp_path / "run" / "checkpoints" / "step_2"
    with pytest.raises(
        CheckpointExistsError, match="step_4 already exists, and this run would save"
    ):
        Trainer(tiny_config("train.train_iters=4", f"checkpoint.load={step_2}"), parallel)


def test_stray_step_newer_than_latest_is_moved_aside_and_saved_again(
    tiny_config, parallel, tmp_path, capsys
):
    Trainer(tiny_config("train.train_iters=4"), parallel).run()
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(root / "step_4", root / "step_6")  # a stray that records step 4

    trainer = Trainer(tiny_config("train.train_iters=6", "checkpoint.load=auto"), parallel)
    assert "moved step_6 aside to" in capsys.readouterr().out and trainer.step == 4
    assert trainer.run().step == 6
    assert resolve(root) == root / "step_6"
    assert read_json(root / "step_6", "metadata.json")["step"] == 6


def _save_with_file_size_limit(root: Path, limit: int) -> None:
    # A real failing write without root: files may not grow past `limit` (EFBIG, not SIGXFSZ).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        Checkpointer(root).save(2, {"w": torch.ones(1 << 18)}, {"step": 2})
    except CheckpointSaveError as e:
        (root.parent / "error.txt").write_text(str(e))


def test_failed_write_removes_its_partial_save(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    Checkpointer(root).save(1, {"w": torch.ones(8)}, {"step": 1})
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "stem_megatron.checkpoint.dcp"])
    child = ctx.Process(target=_save_with_file_size_limit, args=(root, 64 << 10))
    child.start()
    child.join(120)
    message = (tmp_path / "error.txt").read_text()
    assert (
        message.startswith(f"saving {root / 'step_2'} failed (")
        and "removed the partial save" in message
    )
    assert "\n" not in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MB tmpfs (needs root and mount permission)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _fill(disk: Path, leave: int) -> None:
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


@pytest.mark.slow  # three tiny runs
def test_full_disk_is_refused_before_training_and_before_each_save(
    tiny_config, parallel, small_disk, capsys
):
    _fill(small_disk, 100 << 10)
    with pytest.raises(
        CheckpointSaveError,
        match=f"{small_disk}.* free, a checkpoint of this run needs about .*; free space there",
    ):
        Trainer(tiny_config(f"checkpoint.save={small_disk / 'ck'}"), parallel)

    (small_disk / "filler").unlink()
    save = f"checkpoint.save={small_disk / 'ck'}"
    probe = Trainer(
        tiny_config(
            save, "train.train_iters=1", "optim.lr_warmup_iters=0", "train.eval_interval=0"
        ),
        parallel,
    )
    probe.run()
    one = sum(f.stat().st_size for f in (small_disk / "ck" / "step_1").iterdir())
    shutil.rmtree(small_disk / "ck")
    _fill(small_disk, int(one * 1.5) + (1 << 20))  # room for one checkpoint, not two
    trainer = Trainer(
        tiny_config(
            save, "checkpoint.save_interval=1", "train.train_iters=3", "train.eval_interval=0"
        ),
        parallel,
    )
    with pytest.raises(CheckpointSaveError, match="not saving step_2: .* free"):
        trainer.run()
    assert sorted(p.name for p in (small_disk / "ck").iterdir()) == ["latest", "step_1"]
