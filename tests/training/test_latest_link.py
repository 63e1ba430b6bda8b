"""runs/latest names the run started last, and never replaces what the user put there."""

from __future__ import annotations

import os

import pytest

from stem_megatron.train import main as train_main
from stem_megatron.training.latest_link import point_latest_at
from tests.config_overrides import as_overrides
from tests.conftest import tiny_run_config


def test_latest_is_a_relative_link_to_the_newest_run(tmp_path):
    first, second = tmp_path / "tiny-1", tmp_path / "tiny-2"
    first.mkdir(), second.mkdir()
    assert point_latest_at(first) is None
    assert os.readlink(tmp_path / "latest") == "tiny-1"  # relative: the runs dir can move
    assert point_latest_at(second) is None
    assert (tmp_path / "latest").resolve() == second.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "tiny-1", "tiny-2"]


def test_a_run_given_as_runs_latest_keeps_the_link(tmp_path):
    run = tmp_path / "tiny-1"
    run.mkdir()
    point_latest_at(run)
    assert point_latest_at(tmp_path / "latest") is None  # resuming through the link itself
    assert os.readlink(tmp_path / "latest") == "tiny-1"


def test_a_real_directory_or_file_named_latest_is_left_alone(tmp_path):
    run = tmp_path / "tiny-1"
    run.mkdir()
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "mine.txt").write_text("user data")
    note = point_latest_at(run)
    assert note is not None and "not a symlink" in note and str(tmp_path / "latest") in note
    assert (tmp_path / "latest" / "mine.txt").read_text() == "user data"
    (tmp_path / "latest" / "mine.txt").unlink()
    (tmp_path / "latest").rmdir()
    (tmp_path / "latest").write_text("a file")
    assert "not a symlink" in point_latest_at(run)
    assert (tmp_path / "latest").read_text() == "a file"


def test_a_link_that_cannot_be_made_gives_a_note_and_the_run_goes_on(tmp_path):
    run = tmp_path / "tiny-1"
    run.mkdir()
    # The link is made aside first; a directory in that place makes the OS refuse it (a real
    # failure that root, who ignores file modes, meets too).
    (tmp_path / f".latest.{os.getpid()}" / "x").mkdir(parents=True)
    note = point_latest_at(run)
    assert note is not None and "could not point" in note
    assert not (tmp_path / "latest").exists()


def test_each_training_run_becomes_runs_latest(tiny_run, tmp_path, capsys):
    """The train CLI points runs/latest at the run it starts (repointing is tested above),
    and leaves a user's own `latest` directory alone with a note."""
    runs = tmp_path / "runs"
    tiny_run(runs / "tiny-1")
    assert os.readlink(runs / "latest") == "tiny-1"
    (runs / "latest").unlink()
    (runs / "latest").mkdir()
    capsys.readouterr()
    tiny_run(runs / "tiny-2")
    assert "not a symlink, so it was left as it is" in capsys.readouterr().out
    assert (runs / "latest").is_dir() and not (runs / "latest").is_symlink()


@pytest.fixture
def tiny_run(small_corpus):
    def run(run_dir):
        config = tiny_run_config(
            small_corpus,
            run_dir,
            "train.train_iters=1",
            "optim.lr_warmup_iters=0",
            "train.eval_interval=0",
        )
        assert train_main(as_overrides(config.to_dict()) + ["--sample-prompt", ""]) == 0

    return run
