"""The bundled configs and the prepared corpus are found from any working directory, while a
file of the same relative name in the working directory still comes first."""

from __future__ import annotations

from pathlib import Path

import pytest

from stem_megatron.config import ConfigError
from stem_megatron.config_loader import load_config
from stem_megatron.repo_paths import REPO_ROOT

PREPARED = (REPO_ROOT / "data/prepared/shakespeare_train.idx").exists()


def test_bundled_config_and_data_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/tiny.yaml", ["data.tokenizer=data/corpus/SOURCE.md"])
    assert config.name == "tiny" and config.model.num_layers == 6
    assert config.data.tokenizer == str(REPO_ROOT / "data/corpus/SOURCE.md")
    assert config.run_dir == Path("runs/tiny")  # outputs still go where the user is


@pytest.mark.skipif(not PREPARED, reason="the bundled corpus is not prepared (make data)")
def test_the_prepared_corpus_resolves_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = load_config("configs/tiny.yaml").data  # dataset prefixes: found by their .idx
    assert data.tokenizer == str(REPO_ROOT / "data/prepared/tokenizer.json")
    assert data.train_data == str(REPO_ROOT / "data/prepared/shakespeare_train")
    assert data.valid_data == str(REPO_ROOT / "data/prepared/shakespeare_val")


def test_files_in_the_working_directory_come_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/tiny.yaml").write_text("train:\n  train_iters: 7\n")
    (tmp_path / "data/corpus").mkdir(parents=True)
    (tmp_path / "data/corpus/SOURCE.md").write_text("mine")
    config = load_config("configs/tiny.yaml", ["data.tokenizer=data/corpus/SOURCE.md"])
    assert config.train.train_iters == 7
    assert config.data.tokenizer == "data/corpus/SOURCE.md"


def test_a_path_found_nowhere_is_reported_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config file 'configs/nope.yaml' does not exist"):
        load_config("configs/nope.yaml")
    assert load_config(None, ["data.tokenizer=mine.json"]).data.tokenizer == "mine.json"
