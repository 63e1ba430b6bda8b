"""The tokenizer files of an export, so `AutoTokenizer.from_pretrained(dir)` finds them.

A Hugging Face `tokenizer.json` (what our training prepares) is copied with a
`tokenizer_config.json` naming PreTrainedTokenizerFast and the end-of-document token as EOS.
Other formats our loader reads (SentencePiece `.model`, GPT-2 `vocab.json` + `merges.txt`)
are copied as they are, without a tokenizer_config.json: transformers' loading of those is
not something we test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stem_megatron.data.tokenizer import Tokenizer


def _source_files(path: Path) -> list[Path]:
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return [path / "tokenizer.json"]
    if path.is_dir():
        return [path / "vocab.json", path / "merges.txt"]
    return [path]


def write_tokenizer_files(
    tokenizer_path: str, tokenizer: Tokenizer, out_dir: Path, model_max_length: int
) -> list[str]:
    """Copy the tokenizer at `tokenizer_path` into `out_dir`; the names written."""
    sources = _source_files(Path(tokenizer_path))
    names = []
    for src in sources:
        shutil.copyfile(src, out_dir / src.name)
        names.append(src.name)
    if sources[0].name.endswith(".json") and sources[0].name != "vocab.json":
        if sources[0].name != "tokenizer.json":
            (out_dir / sources[0].name).rename(out_dir / "tokenizer.json")
            names = ["tokenizer.json"]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": tokenizer.decode([tokenizer.eod_id]),
            "model_max_length": model_max_length,
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        names.append("tokenizer_config.json")
    return names
