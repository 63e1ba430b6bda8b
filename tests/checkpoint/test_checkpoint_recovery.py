"""Step dirs newer than `latest` (a save killed between its two renames, or a stray copy) are
adopted when verified, else moved aside, each with a line; older ones are left alone."""

import shutil
from pathlib import Path

import torch

from stem_megatron.checkpoint.dcp import Checkpointer, resolve
from stem_megatron.checkpoint.manifest import MANIFEST_JSON


def _run(root: Path) -> Checkpointer:
    ckpt = Checkpointer(root)
    for step in (2, 4):
        ckpt.save(step, {"w": torch.full((64,), float(step))}, {"step": step})
    return ckpt


def _names(root: Path) -> list[str]:
    return sorted(p.name[: len("stray-step_6")] for p in root.iterdir())


def test_complete_step_newer_than_latest_is_adopted(tmp_path: Path) -> None:
    ckpt = _run(tmp_path)
    ckpt.save(6, {"w": torch.full((64,), 6.0)}, {"step": 6})
    (tmp_path / "latest").write_text("step_4\n")  # the save of step 6 died before the pointer

    [line] = ckpt.recover_strays()
    assert line.startswith(f"adopted {tmp_path / 'step_6'}: ") and "(step_4)" in line
    assert resolve(tmp_path) == tmp_path / "step_6"
    assert ckpt.recover_strays() == []  # nothing left to do on the next requeue


def test_untrustworthy_strays_are_moved_aside_newest_first(tmp_path: Path) -> None:
    ckpt = _run(tmp_path)
    shutil.copytree(tmp_path / "step_4", tmp_path / "step_6")  # records step 4, not 6
    (tmp_path / "step_8").mkdir()  # incomplete
    ckpt.save(10, {"w": torch.ones(64)}, {"step": 10})
    (tmp_path / "step_10" / MANIFEST_JSON).unlink()  # cannot be verified
    (tmp_path / "latest").write_text("step_4\n")

    lines = ckpt.recover_strays()
    assert [line.split(" aside")[0] for line in lines] == [
        "moved step_10",
        "moved step_8",
        "moved step_6",
    ]
    assert "no manifest.json" in lines[0] and "missing .metadata" in lines[1]
    assert "records step 4" in lines[2]
    assert _names(tmp_path) == [
        "latest",
        "step_2",
        "step_4",
        "stray-step_1",
        "stray-step_6",
        "stray-step_8",
    ]
    assert resolve(tmp_path) == tmp_path / "step_4"
    # The next save of step 6 now succeeds instead of failing on every requeue.
    ckpt.save(6, {"w": torch.zeros(64)}, {"step": 6})
    assert resolve(tmp_path) == tmp_path / "step_6"


def test_first_save_interrupted_before_any_pointer(tmp_path: Path) -> None:
    ckpt = _run(tmp_path)
    (tmp_path / "latest").unlink()
    shutil.rmtree(tmp_path / "step_2")
    [line] = ckpt.recover_strays()
    assert "adopted" in line and "(none)" in line
    assert resolve(tmp_path) == tmp_path / "step_4"


def test_consistent_or_absent_dir_is_left_alone(tmp_path: Path) -> None:
    assert Checkpointer(tmp_path / "none").recover_strays() == []
    ckpt = _run(tmp_path)
    assert ckpt.recover_strays() == []
    assert _names(tmp_path) == ["latest", "step_2", "step_4"]
