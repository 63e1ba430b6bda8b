"""Prepare the bundled default corpus: tokenizer + train/val datasets, once.

    stem-prepare-data [--force]

Reads data/corpus/shakespeare.jsonl.xz (42 works), trains a byte-level BPE (vocab 8192)
into data/prepared/tokenizer.json if missing, and tokenizes the works into
data/prepared/shakespeare_train / shakespeare_val (2 works held out) if missing.
Does nothing when the outputs exist and validate; --force rebuilds everything.
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from stem_megatron.cli.args import HelpFormatter
from stem_megatron.cli.preprocess_data import preprocess, summary_line
from stem_megatron.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from stem_megatron.repo_paths import REPO_ROOT

# The bundled corpus and its outputs are the checkout's (the package is installed editable).
CORPUS = REPO_ROOT / "data/corpus/shakespeare.jsonl.xz"
OUT_DIR = REPO_ROOT / "data/prepared"
VOCAB_SIZE = 8192
VAL_FRACTION = 0.05  # round(42 * 0.05) = 2 works held out
SEED = 1234


def _texts(corpus: Path) -> Iterator[str]:
    with lzma.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def _datasets_ready(prefix: Path, tokenizer_path: Path) -> bool:
    """True if both splits open, validate, and were made with this very tokenizer."""
    from stem_megatron.data.indexed import DatasetError, open_dataset  # torch: after arguments

    tok = load_tokenizer(tokenizer_path)
    try:
        for split in ("train", "val"):
            ds = open_dataset(f"{prefix}_{split}")
            if ds.meta["tokenizer"]["fingerprint"] != tok.fingerprint:
                return False
    except DatasetError:
        return False
    return True


def prepare_corpus(
    corpus: Path = CORPUS,
    out_dir: Path = OUT_DIR,
    *,
    vocab_size: int = VOCAB_SIZE,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
    force: bool = False,
    log=print,
) -> dict[str, Path]:
    """Build what is missing (everything with force); return the tokenizer and dataset paths."""
    out_dir = Path(out_dir)
    name = Path(corpus).name.split(".")[0]
    tok_path, prefix = out_dir / "tokenizer.json", out_dir / name
    paths = {"tokenizer": tok_path, "train": Path(f"{prefix}_train"), "val": Path(f"{prefix}_val")}

    if force or not tok_path.exists():
        t0 = time.perf_counter()
        tok = train_bpe_tokenizer(_texts(Path(corpus)), vocab_size, tok_path)
        log(f"trained {tok_path} (vocab_size {tok.vocab_size}) in {time.perf_counter() - t0:.1f} s")
        force = True  # datasets made with any earlier tokenizer are now stale
    if not force and _datasets_ready(prefix, tok_path):
        log(f"corpus ready: {tok_path}, {paths['train']}, {paths['val']}")
        return paths
    result = preprocess(
        [corpus], tok_path, prefix, val_fraction=val_fraction, seed=seed, overwrite=True
    )
    log(summary_line(result))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    ap.add_argument(
        "--force", action="store_true", help="retrain the tokenizer and rebuild the datasets"
    )
    args = ap.parse_args(argv)
    try:
        prepare_corpus(force=args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
