import json
import os
import shutil

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from stem_megatron.data.indexed import (
    DatasetError,
    DatasetWriter,
    check_token_range,
    check_vocab,
    open_dataset,
)
from stem_megatron.data.tokenizer import load_tokenizer, train_bpe_tokenizer


def _write(prefix, tok, docs) -> dict:
    with DatasetWriter(prefix, tok, {"split": "test"}) as w:
        for d in docs:
            w.add_document(list(d) + [tok.eod_id])
        return w.commit()


@pytest.fixture()
def tok(tok_path):
    return load_tokenizer(tok_path)


@pytest.fixture()
def built(tmp_path, tok, texts):
    docs = [tok.encode(t) for t in texts[:10]]
    prefix = str(tmp_path / "ds")
    meta = _write(prefix, tok, docs)
    return prefix, docs, meta


def test_round_trip_through_megatron_reader(built, tok, texts):
    prefix, docs, meta = built
    ds = open_dataset(prefix, vocab_size=tok.vocab_size)
    assert ds.num_documents == 10 and meta["num_documents"] == 10
    assert ds.num_tokens == meta["num_tokens"] == sum(len(d) + 1 for d in docs)
    assert ds.tokens.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == {
        "name": tok.name,
        "vocab_size": 400,
        "eod_id": tok.eod_id,
        "fingerprint": tok.fingerprint,
    }
    assert meta["split"] == "test"
    # The flat stream is the documents joined by eod, and megatron-core reads each document.
    expected = np.concatenate([np.array(d + [tok.eod_id]) for d in docs])
    np.testing.assert_array_equal(ds.tokens, expected)
    plain = IndexedDataset(prefix)
    for i in (0, 9):
        assert plain[i].tolist() == docs[i] + [tok.eod_id]
        assert tok.decode(plain[i][:-1].tolist()) == texts[i]
    assert sorted(os.listdir(os.path.dirname(prefix))) == [
        "ds.bin",
        "ds.idx",
        "ds.meta.json",
    ]  # no temp files


@pytest.mark.parametrize("ext", [".bin", ".idx"])
def test_missing_file(built, ext):
    prefix = built[0]
    os.unlink(prefix + ext)
    with pytest.raises(DatasetError) as e:
        open_dataset(prefix)
    msg = str(e.value)
    assert prefix + ext in msg and "missing" in msg and "tools/preprocess_data.py" in msg


def test_truncated_bin(built):
    prefix, _, meta = built
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(meta["bin_bytes"] - 6)
    with pytest.raises(DatasetError) as e:
        open_dataset(prefix)
    msg = str(e.value)
    assert f"{prefix}.bin: truncated: {meta['bin_bytes'] - 6} bytes" in msg
    assert f"({meta['bin_bytes']} bytes)" in msg and "re-run tools/preprocess_data.py" in msg


def test_zero_byte_bin(built):
    prefix = built[0]
    open(prefix + ".bin", "w").close()
    with pytest.raises(DatasetError, match=r"\.bin: truncated to 0 bytes"):
        open_dataset(prefix)


def test_idx_that_is_not_an_index(built):
    prefix = built[0]
    with open(prefix + ".idx", "wb") as f:
        f.write(b"this is not an index file at all, just some bytes")
    with pytest.raises(DatasetError, match=r"ds\.idx: not a Megatron index file"):
        open_dataset(prefix)


def test_truncated_idx(built):
    prefix = built[0]
    size = os.path.getsize(prefix + ".idx")
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(
        DatasetError,
        match=rf"ds\.idx: index is {size - 8} bytes but its header describes 10 sequences",
    ):
        open_dataset(prefix)


def test_idx_from_another_dataset(tmp_path, built, tok, texts):
    prefix = built[0]
    other = str(tmp_path / "other")
    _write(other, tok, [tok.encode(t) for t in texts[20:25]])
    shutil.copy(other + ".idx", prefix + ".idx")
    with pytest.raises(DatasetError) as e:
        open_dataset(prefix, require_meta=False)
    # The other index describes fewer tokens than this .bin holds.
    assert (
        f"{prefix}.bin: {os.path.getsize(prefix + '.bin')} bytes but {prefix}.idx describes only"
        in str(e.value)
    )
    assert "does not belong to this .bin" in str(e.value)


def test_idx_with_same_sizes_but_other_content_is_caught_by_sidecar(tmp_path, tok):
    # Two datasets with equal total length but different document boundaries.
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write(a, tok, [[5, 6, 7], [8]])
    _write(b, tok, [[5], [6, 7, 8]])
    shutil.copy(b + ".idx", a + ".idx")
    with pytest.raises(DatasetError) as e:
        open_dataset(a)
    assert "a.meta.json" in str(e.value) and "different preprocessing runs" in str(e.value)


def test_missing_sidecar_required_by_default(built):
    prefix = built[0]
    os.unlink(prefix + ".meta.json")
    with pytest.raises(DatasetError, match="sidecar .* is missing"):
        open_dataset(prefix)
    assert open_dataset(prefix, require_meta=False).meta is None


def test_out_of_range_ids(built, tok):
    prefix, docs, _ = built
    ds = open_dataset(prefix)
    vocab = int(ds.tokens.max())  # the largest id present is now out of range
    first = int(np.flatnonzero(np.asarray(ds.tokens) >= vocab)[0])
    doc = int(np.searchsorted(np.cumsum([len(d) + 1 for d in docs]), first, side="right"))
    with pytest.raises(DatasetError) as e:
        check_token_range(ds, vocab)
    msg = str(e.value)
    assert f"token id {vocab} at position {first} (document {doc})" in msg
    assert f"vocabulary of size {vocab}" in msg and "ds.bin" in msg
    with pytest.raises(DatasetError):
        open_dataset(prefix, vocab_size=vocab)
    check_token_range(ds, vocab + 1)


def test_token_range_scan_crosses_blocks(tmp_path, tok):
    prefix = str(tmp_path / "p")
    _write(prefix, tok, [[1] * 20, [2] * 10 + [399]])
    ds = open_dataset(prefix)
    with pytest.raises(DatasetError, match="token id 399 at position 31 .document 1."):
        check_token_range(ds, 399, block_tokens=7)  # many blocks: the bad id sits in a later one


def test_vocab_mismatch_with_model_and_tokenizer(built, tok, tmp_path, texts):
    ds = open_dataset(built[0])
    check_vocab(ds, 400, tok)
    check_vocab(ds, 512, tok)  # padded model vocab is fine
    with pytest.raises(DatasetError) as e:
        check_vocab(ds, 256, tok)
    assert "vocab_size 400" in str(e.value) and "vocab_size is 256" in str(e.value)
    bigger = train_bpe_tokenizer(texts, 450, tmp_path / "t450.json")
    with pytest.raises(DatasetError) as e:
        check_vocab(ds, 512, bigger)
    assert "vocab_size 400" in str(e.value) and "vocab_size 450" in str(e.value)
    same_size = train_bpe_tokenizer(texts[30:], 400, tmp_path / "t400.json")
    with pytest.raises(DatasetError, match="a different file"):
        check_vocab(ds, 400, same_size)


def test_writer_rejects_ids_outside_tokenizer_vocab(tmp_path, tok):
    prefix = str(tmp_path / "w")
    with pytest.raises(DatasetError, match=r"outside \[0, 400\)"):
        with DatasetWriter(prefix, tok) as w:
            w.add_document([1, 2, 400])
    assert os.listdir(tmp_path) == []  # the aborted writer left nothing behind


def test_rewrite_replaces_sidecar(built, tok):
    prefix = built[0]
    meta = _write(prefix, tok, [[3, 4, 5]])
    assert json.loads(open(prefix + ".meta.json").read())["num_tokens"] == meta["num_tokens"] == 4
    assert open_dataset(prefix).tokens.tolist() == [3, 4, 5, tok.eod_id]
