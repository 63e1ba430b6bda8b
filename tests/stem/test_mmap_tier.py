"""The `mmap` storage tier: tables and their optimizer state in memory-mapped files that are
unlinked once mapped; training equals device tables bitwise; bad directories and full disks
are refused before anything is allocated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stem_megatron.stem.storage import MmapFiles
from stem_megatron.training.trainer import Trainer
from tests.training.test_trainer import metrics_by_step

ROOT = Path(__file__).resolve().parents[2]


def mapped_table_files() -> set[str]:
    """Unlinked table files this process has mapped (Linux)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(None, 5)[5] for line in maps if "stem-table-" in line}


def test_mapped_tensors_start_at_zero_and_leave_no_files(tmp_path):
    files = MmapFiles(tmp_path / "tables")
    table = files.zeros((300, 16), torch.float32)
    assert table.shape == (300, 16) and not table.any()
    table[7] = 2.5
    copy = files.copy(torch.arange(12.0).view(3, 4))
    assert torch.equal(copy, torch.arange(12.0).view(3, 4)) and table[7].eq(2.5).all()
    assert list((tmp_path / "tables").iterdir()) == []  # unlinked: nothing left behind


def test_a_directory_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(
        PermissionError,
        match=r"stem.mmap_dir .*a_file/tables is not writable "
        r"\(Not a directory\): set stem.mmap_dir to a "
        r"writable directory on a local disk",
    ):
        MmapFiles(blocker / "tables")
    assert blocker.read_text() == "not a directory"


def test_tables_larger_than_the_free_disk_are_refused(tmp_path):
    files = MmapFiles(tmp_path)
    with pytest.raises(
        MemoryError,
        match=r"2 tables needs [\d,]+ bytes on disk in .* but only "
        r"[\d,]+ bytes are free; set stem.mmap_dir",
    ):
        files.check_fits(files.free_bytes() + 1, "2 tables")


def test_mmap_tables_train_exactly_like_device_tables(tiny_config, parallel, tmp_path):
    """12 steps with evaluations, then a resume from the step-6 checkpoint: identical losses
    and parameters (bitwise), the cache on for the mmap run. The tables and both moments of
    each are mapped files (unlinked: listed as deleted in /proc/self/maps)."""
    mode = "exact"  # its settling writes rows too; lazy takes the same paths otherwise
    runs = {}
    for storage in ("device", "mmap"):
        extra = ["stem.cache_rows=32"] if storage == "mmap" else []
        config = tiny_config(
            f"stem.storage={storage}",
            f"stem.optimizer.mode={mode}",
            "stem.layers=[0,1]",
            "train.train_iters=12",
            "train.eval_interval=6",
            "checkpoint.save_interval=6",
            f"stem.mmap_dir={tmp_path / 'maps'}",
            f"logging.run_dir={tmp_path / storage}",
            *extra,
        )
        trainer = Trainer(config, parallel)
        if storage == "mmap":
            assert len(mapped_table_files()) == 2 * 3  # two tables, each with two moments
        trainer.run()
        runs[storage] = (
            metrics_by_step(config.run_dir),
            {n: p.detach().clone() for n, p in trainer.chunks[0].named_parameters()},
        )
        del trainer
    (device, device_params), (mapped, mapped_params) = runs["device"], runs["mmap"]
    for step in device:
        assert mapped[step].get("loss/train") == device[step].get("loss/train"), step
    assert mapped[12]["loss/val"] == device[12]["loss/val"]
    for name, value in device_params.items():
        assert torch.equal(mapped_params[name], value), name
    assert list((tmp_path / "maps").iterdir()) == []
    # Resume the mmap run from its step-6 checkpoint: the same last six steps.
    resumed = tiny_config(
        "stem.storage=mmap",
        f"stem.optimizer.mode={mode}",
        "stem.layers=[0,1]",
        "train.train_iters=12",
        "train.eval_interval=6",
        f"stem.mmap_dir={tmp_path / 'maps'}",
        f"checkpoint.load={tmp_path / 'mmap' / 'checkpoints' / 'step_6'}",
        f"checkpoint.save={tmp_path / 'resumed_ckpt'}",
        f"logging.run_dir={tmp_path / 'resumed'}",
    )
    trainer = Trainer(resumed, parallel)
    trainer.run()
    again = metrics_by_step(resumed.run_dir)
    for step in range(7, 13):
        assert again[step]["loss/train"] == device[step]["loss/train"], step
    for name, param in trainer.chunks[0].named_parameters():
        assert torch.equal(param.detach(), device_params[name]), name


def test_train_refuses_an_unwritable_mmap_dir_with_one_line(tmp_path, small_corpus):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stem_megatron.train",
            "--config",
            "configs/tiny.yaml",
            "stem.storage=mmap",
            f"stem.mmap_dir={blocker / 'maps'}",
            f"data.tokenizer={small_corpus['tokenizer']}",
            f"data.train_data={small_corpus['train']}",
            f"data.valid_data={small_corpus['val']}",
            f"logging.run_dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2  # refused with the config, before the model is built
    assert "error: stem.mmap_dir" in proc.stderr and "cannot be written" in proc.stderr
    assert "Traceback" not in proc.stderr and blocker.read_text() == "keep me"
    assert not (tmp_path / "run" / "checkpoints").exists()
