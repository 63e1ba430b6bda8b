import json
import lzma
import os

import numpy as np
import pytest

from stem_megatron.cli.prepare_corpus import CORPUS, VAL_FRACTION, VOCAB_SIZE, prepare_corpus
from stem_megatron.data.indexed import check_vocab, open_dataset
from stem_megatron.data.tokenizer import load_tokenizer


@pytest.fixture()
def corpus(tmp_path, texts):
    path = tmp_path / "works.jsonl.xz"
    with lzma.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts[:20]):
            f.write(json.dumps({"title": f"work {i}", "text": t}) + "\n")
    return path


def test_builds_once_then_is_ready(tmp_path, corpus):
    out = tmp_path / "prepared"
    logs: list[str] = []
    paths = prepare_corpus(corpus, out, vocab_size=300, val_fraction=0.1, log=logs.append)
    assert paths == {
        "tokenizer": out / "tokenizer.json",
        "train": out / "works_train",
        "val": out / "works_val",
    }
    assert logs[0].startswith(f"trained {out / 'tokenizer.json'} (vocab_size 300)")
    assert logs[1].startswith("preprocessed 20 documents") and "val 2 docs" in logs[1]
    stamps = {p: os.stat(p).st_mtime_ns for p in out.iterdir()}

    logs.clear()
    prepare_corpus(corpus, out, vocab_size=300, val_fraction=0.1, log=logs.append)
    assert logs == [
        f"corpus ready: {out / 'tokenizer.json'}, {out / 'works_train'}, {out / 'works_val'}"
    ]
    assert {p: os.stat(p).st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten


def test_rebuilds_damaged_datasets_and_force_rebuilds_all(tmp_path, corpus):
    out = tmp_path / "prepared"
    prepare_corpus(corpus, out, vocab_size=300, val_fraction=0.1, log=lambda s: None)
    tok_mtime = os.stat(out / "tokenizer.json").st_mtime_ns
    os.unlink(out / "works_val.idx")
    logs: list[str] = []
    prepare_corpus(corpus, out, vocab_size=300, val_fraction=0.1, log=logs.append)
    assert len(logs) == 1 and logs[0].startswith("preprocessed 20 documents")
    assert os.stat(out / "tokenizer.json").st_mtime_ns == tok_mtime  # the tokenizer was kept
    logs.clear()
    prepare_corpus(corpus, out, vocab_size=300, val_fraction=0.1, force=True, log=logs.append)
    assert logs[0].startswith("trained") and logs[1].startswith("preprocessed")
    assert open_dataset(out / "works_val").num_documents == 2


@pytest.mark.slow
def test_full_bundled_corpus(tmp_path):
    logs: list[str] = []
    paths = prepare_corpus(CORPUS, tmp_path, log=logs.append)
    tok = load_tokenizer(paths["tokenizer"])
    assert tok.vocab_size == VOCAB_SIZE
    train, val = (
        open_dataset(paths["train"], vocab_size=VOCAB_SIZE),
        open_dataset(paths["val"], vocab_size=VOCAB_SIZE),
    )
    check_vocab(train, VOCAB_SIZE, tok)
    assert (train.num_documents, val.num_documents) == (40, 2) == (42 - round(42 * VAL_FRACTION), 2)
    assert train.num_tokens > 1_000_000 and val.num_tokens > 20_000
    counts = np.bincount(train.tokens, minlength=VOCAB_SIZE)
    assert (
        counts > 0
    ).sum() > 0.9 * VOCAB_SIZE  # the trained vocab is actually used (94% measured)
    works = [json.loads(line)["text"] for line in lzma.open(CORPUS, "rt", encoding="utf-8")]
    for doc in val.index:
        assert doc[-1] == tok.eod_id and tok.decode(doc[:-1].tolist()) in works
