"""The bundled corpus's prepared files (the data config's defaults) exist only after
`make data` / `python tools/prepare_corpus.py`; a run that uses them before says so."""

from __future__ import annotations

from pathlib import Path

from stem_megatron.config import DataConfig


def check_bundled_data_prepared(data: DataConfig) -> None:
    """Raise ValueError naming the set-up step when a default data path is used but missing."""
    bundled = DataConfig()
    used = [
        (data.tokenizer, bundled.tokenizer, bundled.tokenizer),
        (data.train_data, bundled.train_data, bundled.train_data + ".idx"),
        (data.valid_data, bundled.valid_data, f"{bundled.valid_data}.idx"),
    ]
    missing = [
        file for given, default, file in used if given == default and not Path(file).exists()
    ]
    if missing:
        raise ValueError(
            f"the bundled corpus is not prepared yet ({', '.join(missing)} missing): run "
            f"`make data` or `python tools/prepare_corpus.py` from the repository root, or set "
            f"data.tokenizer / data.train_data / data.valid_data to your own files"
        )
