"""The bundled configs and the prepared corpus are found from any working directory, while a
file of the same relative name in the working directory still comes first."""

from __future__ import annotations

from pathlib import Path

import pytest

from stem_megatron.config import ConfigError, load_config
from stem_megatron.repo_paths import REPO_ROOT

pytestmark = pytest.mark.skipif(not (REPO_ROOT / "data/prepared/tokenizer.json").exists(),
                                reason="the bundled corpus is not prepared (make data)")


def test_bundled_config_and_corpus_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/tiny.yaml")
    assert config.name == "tiny"
    assert config.data.tokenizer == str(REPO_ROOT / "data/prepared/tokenizer.json")
    assert config.data.train_data == str(REPO_ROOT / "data/prepared/shakespeare_train")
    assert config.data.valid_data == str(REPO_ROOT / "data/prepared/shakespeare_val")
    assert config.run_dir == Path("runs/tiny")  # outputs still go where the user is


def test_files_in_the_working_directory_come_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/tiny.yaml").write_text("train:\n  train_iters: 7\n")
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/tokenizer.json").write_text("{}")
    config = load_config("configs/tiny.yaml")
    assert config.train.train_iters == 7
    assert config.data.tokenizer == "data/prepared/tokenizer.json"
    assert config.data.train_data == str(REPO_ROOT / "data/prepared/shakespeare_train")


def test_a_path_found_nowhere_is_reported_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config file 'configs/nope.yaml' does not exist"):
        load_config("configs/nope.yaml")
    assert load_config(None, ["data.tokenizer=mine.json"]).data.tokenizer == "mine.json"
