"""resolve(): which checkpoint a path designates, and clear errors when none."""

from pathlib import Path

import pytest
import torch

from stem_megatron.checkpoint.dcp import Checkpointer, resolve
from stem_megatron.checkpoint.errors import CheckpointNotFoundError


@pytest.fixture
def run(tmp_path: Path) -> Path:
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    ckpt.save(10, {"w": torch.ones(1)}, {"step": 10})
    ckpt.save(20, {"w": torch.ones(1)}, {"step": 20})
    return tmp_path / "run"


def test_accepts_step_dir_checkpoints_dir_and_run_dir(run: Path) -> None:
    root = run / "checkpoints"
    assert resolve(root / "step_10") == root / "step_10"
    assert resolve(root) == root / "step_20"
    assert resolve(run) == root / "step_20"
    assert resolve(str(run)) == root / "step_20"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint path"):
        resolve(tmp_path / "nope")


def test_no_latest_pointer(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointNotFoundError, match="no 'latest' pointer in .*checkpoints"):
        resolve(tmp_path / "run")
    assert Checkpointer(tmp_path / "run" / "checkpoints").latest() is None


def test_latest_pointing_to_missing_dir(run: Path) -> None:
    (run / "checkpoints" / "latest").write_text("step_30\n")
    with pytest.raises(CheckpointNotFoundError, match="points to step_30, but .* does not exist"):
        resolve(run)


def test_latest_with_garbage(run: Path) -> None:
    (run / "checkpoints" / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointNotFoundError, match="expected 'step_<N>'"):
        resolve(run)


@pytest.mark.parametrize("removed", [".metadata", "metadata.json", "scalars.json"])
def test_incomplete_checkpoint(run: Path, removed: str) -> None:
    (run / "checkpoints" / "step_20" / removed).unlink()
    with pytest.raises(
        CheckpointNotFoundError, match=f"not a complete checkpoint: missing {removed}"
    ):
        resolve(run)
    with pytest.raises(CheckpointNotFoundError, match="not a complete checkpoint"):
        resolve(run / "checkpoints" / "step_20")


def test_tmp_dir_is_not_a_checkpoint(run: Path) -> None:
    tmp = run / "checkpoints" / ".tmp_step_30_abcd"
    tmp.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="unfinished"):
        resolve(tmp)


def test_latest_prefers_a_newer_complete_step_than_the_pointer(tmp_path):
    """A crash between the rename of step_N and the pointer update must not make resumes
    redo step N (its save would be refused forever)."""
    import torch

    from stem_megatron.checkpoint.dcp import Checkpointer

    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"w": torch.zeros(2)}, {"step": 1})
    ckpt.save(2, {"w": torch.ones(2)}, {"step": 2})
    (tmp_path / "latest").write_text("step_1\n")  # as if the save of step 2 died before it
    (tmp_path / "step_3").mkdir()  # an incomplete dir never counts
    assert ckpt.latest() == tmp_path / "step_2"
