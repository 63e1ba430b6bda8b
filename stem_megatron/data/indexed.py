"""Megatron indexed datasets (`<prefix>.bin` / `<prefix>.idx`), written and read through
megatron-core's own `indexed_dataset`, plus what it lacks:

- checks that fail before training starts, with the file, the fault and the fix
  (megatron-core only asserts, or reads garbage from a truncated `.bin`);
- a `<prefix>.meta.json` sidecar recording the tokenizer and the counts, so a dataset
  tokenized for one vocabulary is never fed to a model or tokenizer of another;
- an atomic writer: files are built under temp names and renamed, sidecar last.

Each document is one sequence of the dataset and ends with the tokenizer's eod id, so the
`.bin` is the stream of documents joined by eod that the sampler reads as one flat array.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

with warnings.catch_warnings():  # importing megatron.core warns about TE/apex, irrelevant to data
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.indexed_dataset import (
        _INDEX_HEADER,
        DType,
        IndexedDataset,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

from stem_megatron.data.tokenizer import Tokenizer, atomic_write_text

META_VERSION = 1
_FIX = "re-run tools/preprocess_data.py (with --overwrite) to rebuild it"
_IDX_HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
_CHUNK = 1 << 24  # tokens per block when scanning: bounded memory on any dataset size


class DatasetError(ValueError):
    """A dataset on disk is missing, damaged, or does not fit the model/tokenizer."""


def meta_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.meta.json"


def dataset_files(prefix: str | os.PathLike) -> list[str]:
    p = str(prefix)
    return [get_bin_path(p), get_idx_path(p), meta_path(p)]


@dataclass
class TokenDataset:
    """An opened, validated dataset: megatron-core's reader plus a flat view of all tokens."""

    prefix: str
    index: IndexedDataset  # documents, for anything that wants them one by one
    tokens: np.ndarray  # read-only memmap over the whole .bin (documents joined by eod)
    meta: dict | None

    @property
    def num_documents(self) -> int:
        return len(self.index.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def open_dataset(
    prefix: str | os.PathLike, *, vocab_size: int | None = None, require_meta: bool = True
) -> TokenDataset:
    """Open `<prefix>.bin/.idx`, validating structure, sidecar and (given vocab_size) ids.

    `require_meta=False` accepts datasets made by Megatron-LM's own preprocessing (no
    sidecar); their vocabulary can then only be checked by scanning the ids.
    """
    prefix = str(prefix)
    bin_path, idx_path = get_bin_path(prefix), get_idx_path(prefix)
    for path, kind in ((idx_path, "index (.idx)"), (bin_path, "token data (.bin)")):
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: {kind} file of dataset {prefix} is missing; {_FIX}")
    dtype, seq_count, doc_count = _read_idx_header(idx_path)
    expected_idx = _IDX_HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8
    if os.path.getsize(idx_path) != expected_idx:
        raise DatasetError(
            f"{idx_path}: index is {os.path.getsize(idx_path)} bytes but its header describes "
            f"{seq_count} sequences / {doc_count} document marks ({expected_idx} bytes): "
            f"truncated or corrupt; {_FIX}"
        )
    if seq_count == 0 or doc_count < 2:
        raise DatasetError(
            f"{idx_path}: dataset {prefix} holds no documents; {_FIX} from non-empty inputs"
        )
    # Checked before megatron-core, which cannot mmap an empty file.
    if os.path.getsize(bin_path) == 0:
        raise DatasetError(
            f"{bin_path}: truncated to 0 bytes but {idx_path} lists {seq_count} sequences; {_FIX}"
        )
    try:
        index = IndexedDataset(prefix, mmap=True)
    except AssertionError as e:  # megatron-core's own consistency asserts
        why = e or "sequence/document counts disagree"
        raise DatasetError(f"{idx_path}: index is inconsistent ({why}); {_FIX}") from e
    lengths = index.sequence_lengths.astype(np.int64)
    itemsize = np.dtype(dtype).itemsize
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) * itemsize
    docs = index.document_indices
    if (
        docs[0] != 0
        or np.any(np.diff(docs) < 0)
        or np.any(lengths < 0)
        or not np.array_equal(index.index.sequence_pointers, starts)
    ):
        raise DatasetError(
            f"{idx_path}: index is inconsistent (document marks or byte offsets do not describe "
            f"contiguous sequences); {_FIX}"
        )
    total = int(lengths.sum())
    bin_bytes, want = os.path.getsize(bin_path), total * itemsize
    if bin_bytes < want:
        raise DatasetError(
            f"{bin_path}: truncated: {bin_bytes} bytes but {idx_path} describes {total} tokens "
            f"of {itemsize} bytes ({want} bytes), e.g. an interrupted copy; {_FIX} or copy it again"
        )
    if bin_bytes > want:
        raise DatasetError(
            f"{bin_path}: {bin_bytes} bytes but {idx_path} describes only {want} bytes: the index "
            f"does not belong to this .bin; {_FIX}"
        )
    meta = _check_meta(prefix, require_meta, doc_count - 1, total, bin_bytes, idx_path)
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(total,))
    ds = TokenDataset(prefix=prefix, index=index, tokens=tokens, meta=meta)
    if vocab_size is not None:
        check_token_range(ds, vocab_size)
    return ds


def _read_idx_header(idx_path: str) -> tuple[type, int, int]:
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_HEADER_BYTES)
    if len(head) < _IDX_HEADER_BYTES or head[:9] != _INDEX_HEADER:
        raise DatasetError(f"{idx_path}: not a Megatron index file (bad header); {_FIX}")
    version, code = struct.unpack("<QB", head[9:18])
    seq_count, doc_count = struct.unpack("<QQ", head[18:34])
    valid_codes = {d.value for d in DType if d.name not in ("float32", "float64")}
    if version != 1 or code not in valid_codes:
        raise DatasetError(
            f"{idx_path}: unsupported index (version {version}, dtype code {code}); {_FIX}"
        )
    return DType.dtype_from_code(code), seq_count, doc_count


def _check_meta(
    prefix: str, required: bool, docs: int, tokens: int, bin_bytes: int, idx_path: str
) -> dict | None:
    path = meta_path(prefix)
    if not os.path.isfile(path):
        if required:
            raise DatasetError(
                f"{path}: sidecar of dataset {prefix} is missing, so its tokenizer is unknown; "
                f"{_FIX} "
                "(datasets from Megatron-LM's preprocess_data.py: set data.require_meta=false)"
            )
        return None
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
        recorded = (
            meta["num_documents"],
            meta["num_tokens"],
            meta["bin_bytes"],
            meta["idx_sha256"],
        )
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: unreadable sidecar ({e}); {_FIX}") from e
    actual = (docs, tokens, bin_bytes, _sha256(idx_path))
    if recorded != actual:
        same_counts = "" if recorded[:3] != actual[:3] else " (same counts, different index)"
        raise DatasetError(
            f"{path}: sidecar records {recorded[0]} documents / {recorded[1]} tokens, but the "
            f".bin/.idx hold {docs} / {tokens}{same_counts}: "
            f"the files come from different preprocessing runs; {_FIX}"
        )
    return meta


def check_token_range(
    dataset: TokenDataset, vocab_size: int, *, block_tokens: int = _CHUNK
) -> None:
    """Raise if any token id is outside [0, vocab_size). Vectorised, in bounded blocks."""
    toks = dataset.tokens
    for lo in range(0, toks.shape[0], block_tokens):
        block = toks[lo : lo + block_tokens]
        if block.max() < vocab_size and (block.dtype.kind == "u" or block.min() >= 0):
            continue
        bad = np.flatnonzero((block >= vocab_size) | (block < 0))
        pos = lo + int(bad[0])
        doc = int(
            np.searchsorted(
                np.cumsum(dataset.index.sequence_lengths, dtype=np.int64), pos, side="right"
            )
        )
        raise DatasetError(
            f"{get_bin_path(dataset.prefix)}: token id {int(toks[pos])} at position {pos} "
            f"(document {doc}) is outside the vocabulary of size {vocab_size} "
            f"(max id in this block {int(block.max())}): the data was tokenized with a larger "
            f"tokenizer; use the matching tokenizer/model vocab or {_FIX}"
        )


def check_vocab(
    dataset: TokenDataset, model_vocab_size: int, tokenizer: Tokenizer | None = None
) -> None:
    """Check the dataset's recorded tokenizer against the model's table size and the tokenizer.

    A model vocab larger than the tokenizer's is fine (Megatron pads it for TP divisibility);
    smaller is not, and a tokenizer that differs from the one the data was made with is not.
    """
    meta = dataset.meta
    if meta is None:
        raise DatasetError(
            f"{meta_path(dataset.prefix)}: no sidecar, cannot check the vocabulary; {_FIX}"
        )
    tok = meta["tokenizer"]
    if model_vocab_size < tok["vocab_size"]:
        raise DatasetError(
            f"{dataset.prefix}: tokenized with {tok['name']} (vocab_size {tok['vocab_size']}) "
            f"but the model's vocab_size is {model_vocab_size}: ids up to "
            f"{tok['vocab_size'] - 1} would index past the embedding/STEM tables; "
            f"set the model vocab_size >= {tok['vocab_size']}"
        )
    if tokenizer is not None and (
        tokenizer.vocab_size != tok["vocab_size"]
        or tokenizer.eod_id != tok["eod_id"]
        or tokenizer.fingerprint != tok["fingerprint"]
    ):
        same_size = "" if tokenizer.vocab_size != tok["vocab_size"] else ", a different file"
        raise DatasetError(
            f"{dataset.prefix}: tokenized with {tok['name']} (vocab_size {tok['vocab_size']}, "
            f"eod {tok['eod_id']}) but the tokenizer given is {tokenizer.name} "
            f"(vocab_size {tokenizer.vocab_size}, eod {tokenizer.eod_id}){same_size}; "
            f"use the tokenizer the data was made with, or {_FIX} with this tokenizer"
        )


class DatasetWriter:
    """Build `<prefix>.bin/.idx/.meta.json` under temp names; `commit()` renames them in place.

    Until commit nothing exists under the final names, and the sidecar (which open_dataset
    requires and cross-checks) is renamed last, so an interrupted run never leaves a
    dataset that opens. Used as a context manager, an exception removes the temp files.
    """

    def __init__(
        self, prefix: str | os.PathLike, tokenizer: Tokenizer, extra_meta: dict | None = None
    ):
        self.prefix = str(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = f"{Path(self.prefix).parent}/.{Path(self.prefix).name}.tmp{os.getpid()}"
        self._tokenizer = tokenizer
        self._extra = extra_meta or {}
        self._dtype = DType.optimal_dtype(
            tokenizer.vocab_size
        )  # uint16 below 65500 ids, as Megatron
        self._builder = IndexedDatasetBuilder(get_bin_path(self._tmp), dtype=self._dtype)
        self.num_documents = 0
        self.num_tokens = 0

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document; `ids` must already end with eod."""
        arr = np.asarray(ids, dtype=np.int64)
        # The builder casts to uint16 silently; an out-of-range id must fail here instead.
        if arr.size and (arr.min() < 0 or arr.max() >= self._tokenizer.vocab_size):
            raise DatasetError(
                f"{self.prefix}: token id outside [0, {self._tokenizer.vocab_size}) "
                f"in document {self.num_documents}"
            )
        self._builder.add_item(torch.from_numpy(arr))
        self._builder.end_document()
        self.num_documents += 1
        self.num_tokens += arr.size

    def commit(self) -> dict:
        self._builder.finalize(get_idx_path(self._tmp))
        tok = self._tokenizer
        meta = {
            "format_version": META_VERSION,
            "tokenizer": {
                "name": tok.name,
                "vocab_size": tok.vocab_size,
                "eod_id": tok.eod_id,
                "fingerprint": tok.fingerprint,
            },
            "dtype": np.dtype(self._dtype).name,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "bin_bytes": os.path.getsize(get_bin_path(self._tmp)),
            "idx_sha256": _sha256(get_idx_path(self._tmp)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self._extra,
        }
        atomic_write_text(Path(meta_path(self._tmp)), json.dumps(meta, indent=2) + "\n")
        if os.path.exists(meta_path(self.prefix)):
            os.unlink(meta_path(self.prefix))  # an old sidecar must never vouch for new files
        for tmp, final in zip(dataset_files(self._tmp), dataset_files(self.prefix)):
            os.replace(tmp, final)
        return meta

    def abort(self) -> None:
        self._builder.data_file.close()
        for path in dataset_files(self._tmp):
            if os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
