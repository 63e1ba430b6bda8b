"""Shared fixtures for the data tests: a small synthetic corpus and a tokenizer trained on it."""

from pathlib import Path

import numpy as np
import pytest

from stem_megatron.data.tokenizer import train_bpe_tokenizer

_WORDS = (
    "the of and to a in that is was he for it with as his on be at by had not are but from "
    "or have an they which one you were her all she there would their we him been has when "
    "who will more no if out so said what up its about into than them can only other new "
    "some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well "
    "Thou hast thee thy wherefore naught anon prithee methinks doth ünïcödé café 🙂 'tis"
).split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text documents of 20-120 words, with punctuation and newlines."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        words = rng.choice(_WORDS, size=int(rng.integers(20, 120)))
        docs.append(
            " ".join(
                w + (",.\n"[int(rng.integers(3))] if rng.random() < 0.1 else "") for w in words
            )
        )
    return docs


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return make_texts(60)


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory, texts) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe_tokenizer(texts, 400, path)
    return path
