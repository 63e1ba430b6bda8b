"""A run on the bundled corpus before it is prepared names the set-up step."""

from __future__ import annotations

import pytest

from stem_megatron.config import DataConfig
from stem_megatron.data.bundled import check_bundled_data_prepared


def test_unprepared_bundled_corpus_names_the_setup_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no data/prepared
    with pytest.raises(
        ValueError,
        match=r"bundled corpus is not prepared yet \(data/prepared/"
        r"tokenizer.json, .*shakespeare_train.idx.* run `make data`",
    ):
        check_bundled_data_prepared(DataConfig())
    check_bundled_data_prepared(
        DataConfig(tokenizer="own.json", train_data="own", valid_data=None)
    )  # own data: not our business here
