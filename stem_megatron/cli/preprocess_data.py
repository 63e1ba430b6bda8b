"""Tokenize text into Megatron indexed datasets with a train/validation split.

    stem-preprocess --input a.txt b.jsonl.xz --tokenizer data/prepared/tokenizer.json \
        --output-prefix data/prepared/corpus [--json-key text] [--val-fraction 0.02] [--seed 1234]

Inputs: `.txt` (the whole file is one document) and `.jsonl` (each line's --json-key field
is one document), optionally compressed as `.gz` or `.xz`. Every document is written with
the tokenizer's eod id appended. Outputs `<prefix>_train` and `<prefix>_val`, each
`.bin/.idx/.meta.json`, built under temp names and renamed when complete.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stem_megatron.cli.args import HelpFormatter, fraction, non_negative_int
from stem_megatron.data.tokenizer import Tokenizer, load_tokenizer

_KINDS = (".txt", ".jsonl")
# What a damaged or mis-encoded input raises while being read.
_READ_ERRORS = (UnicodeDecodeError, lzma.LZMAError, gzip.BadGzipFile, EOFError)
_ENCODE_BATCH = 64  # documents per encode_batch call: lets the tokenizer use its threads


def _kind(path: Path) -> tuple[str, str]:
    """(document kind, compression) from names like corpus.jsonl.xz."""
    suffixes = path.suffixes
    comp = suffixes[-1] if suffixes and suffixes[-1] in (".gz", ".xz") else ""
    kind = (
        suffixes[-2]
        if comp and len(suffixes) >= 2
        else (suffixes[-1] if suffixes and not comp else "")
    )
    if kind not in _KINDS:
        raise ValueError(
            f"{path}: unsupported input; expected .txt or .jsonl, "
            "optionally compressed as .gz or .xz"
        )
    return kind, comp


def _open_text(path: Path, comp: str):
    opener = {".gz": gzip.open, ".xz": lzma.open, "": open}[comp]
    return opener(path, "rt", encoding="utf-8")


def _read_error(path: Path, kind: str, comp: str, error: Exception) -> ValueError:
    fix = (
        "if it is text in another encoding, convert it first, e.g. "
        f"iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}"
        if isinstance(error, UnicodeDecodeError)
        else "check that the file is complete"
    )
    return ValueError(f"{path}: cannot read as UTF-8 {kind}{comp}: {error}; {fix}")


def iter_documents(path: Path, json_key: str) -> Iterator[str]:
    """Yield the documents of one input file, failing with file:line on bad content."""
    kind, comp = _kind(path)
    try:
        with _open_text(path, comp) as f:
            if kind == ".txt":
                yield f.read()
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})"
                    ) from None
                if isinstance(obj, dict) and json_key in obj and not isinstance(obj[json_key], str):
                    value = obj[json_key]
                    raise ValueError(
                        f"{path}:{lineno}: field {json_key!r} holds {repr(value)[:40]} "
                        f"(type {type(value).__name__}), not a string"
                    )
                if not isinstance(obj, dict) or json_key not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ValueError(
                        f"{path}:{lineno}: no field {json_key!r} (found {keys}); set --json-key"
                    )
                yield obj[json_key]
    except _READ_ERRORS as e:
        raise _read_error(path, kind, comp, e) from None


def count_documents(paths: Sequence[Path]) -> int:
    """Cheap first pass (no JSON parsing): the split and the progress bar need the total.
    A .txt is one document, but it is decoded here too, so a file that is not UTF-8 is
    reported as such rather than as a split too small."""
    n = 0
    for path in paths:
        kind, comp = _kind(path)
        try:
            with _open_text(path, comp) as f:
                if kind == ".txt":
                    while f.read(1 << 20):
                        pass
                    n += 1
                else:
                    n += sum(1 for line in f if line.strip())
        except _READ_ERRORS as e:
            raise _read_error(path, kind, comp, e) from None
    return n


def split_documents(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents: a seeded choice of round(n * fraction), at least
    one document on each side."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    is_val = np.zeros(n, dtype=bool)
    if val_fraction == 0.0:
        return is_val
    if n < 2:
        raise ValueError(
            f"found {n} document(s): a train/validation split needs at least 2 "
            "(or --val-fraction 0)"
        )
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    is_val[np.random.default_rng(seed).choice(n, size=n_val, replace=False)] = True
    return is_val


def preprocess(
    inputs: Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike | Tokenizer,
    output_prefix: str | os.PathLike,
    *,
    json_key: str = "text",
    val_fraction: float = 0.02,
    seed: int = 1234,
    overwrite: bool = False,
) -> dict:
    """Tokenize `inputs` into `<output_prefix>_train` / `_val`; return counts and timing."""
    from stem_megatron.data.indexed import DatasetWriter, dataset_files  # torch: after arguments

    t0 = time.perf_counter()
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no --input files given")
    for p in paths:
        _kind(p)
        if not p.is_file():
            raise ValueError(f"{p}: input file does not exist")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    prefixes = {"train": f"{output_prefix}_train", "val": f"{output_prefix}_val"}
    existing = [f for pre in prefixes.values() for f in dataset_files(pre) if os.path.exists(f)]
    if existing and not overwrite:
        raise FileExistsError(
            f"output exists: {', '.join(existing)}; pass --overwrite to replace it"
        )

    n = count_documents(paths)
    if n == 0:
        raise ValueError(f"no documents in {', '.join(map(str, paths))}: every input is empty")
    is_val = split_documents(n, val_fraction, seed)
    splits = ["train", "val"] if is_val.any() else ["train"]
    if "val" not in splits:  # with --overwrite, a stale val set must not outlive its train set
        for f in dataset_files(prefixes["val"]):
            if os.path.exists(f):
                os.unlink(f)
    extra = {
        "sources": [str(p) for p in paths],
        "json_key": json_key,
        "seed": seed,
        "val_fraction": val_fraction,
    }
    writers = {s: DatasetWriter(prefixes[s], tok, {"split": s, **extra}) for s in splits}
    try:
        with tqdm(total=n, unit="doc", desc="tokenize", disable=not sys.stderr.isatty()) as bar:
            doc = 0
            for batch in _batches(
                (d for p in paths for d in iter_documents(p, json_key)), _ENCODE_BATCH
            ):
                for ids in tok.encode_batch(batch):
                    writers["val" if is_val[doc] else "train"].add_document(ids + [tok.eod_id])
                    doc += 1
                bar.update(len(batch))
        if doc != n:
            raise ValueError(f"inputs changed while reading: counted {n} documents, read {doc}")
        if all(w.num_tokens == w.num_documents for w in writers.values()):  # eod ids only
            raise ValueError(f"no text in {', '.join(map(str, paths))}: every document is empty")
        metas = {s: w.commit() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return {
        "documents": {s: m["num_documents"] for s, m in metas.items()},
        "tokens": {s: m["num_tokens"] for s, m in metas.items()},
        "prefixes": {s: prefixes[s] for s in metas},
        "seconds": time.perf_counter() - t0,
    }


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def summary_line(result: dict) -> str:
    docs, toks = result["documents"], result["tokens"]
    parts = ", ".join(f"{s} {docs[s]} docs / {toks[s]} tokens" for s in docs)
    return (
        f"preprocessed {sum(docs.values())} documents, {sum(toks.values())} tokens ({parts}) "
        f"in {result['seconds']:.1f} s -> {', '.join(result['prefixes'].values())}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    ap.add_argument(
        "--input", nargs="+", required=True, help=".txt / .jsonl files, optionally .gz / .xz"
    )
    ap.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer.json, SentencePiece .model, or GPT-2 vocab.json+merges.txt dir",
    )
    ap.add_argument(
        "--output-prefix", required=True, help="writes <prefix>_train and <prefix>_val datasets"
    )
    ap.add_argument("--json-key", default="text", help="field holding the document in .jsonl lines")
    ap.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.02,
        help="fraction of documents held out (0: none)",
    )
    ap.add_argument(
        "--seed", type=non_negative_int, default=1234, help="seed of the train/validation split"
    )
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = ap.parse_args(argv)
    try:
        result = preprocess(
            args.input,
            args.tokenizer,
            args.output_prefix,
            json_key=args.json_key,
            val_fraction=args.val_fraction,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary_line(result))
    return 0
