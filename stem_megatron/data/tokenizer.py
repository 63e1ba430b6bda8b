"""Tokenizers: load the usual on-disk formats behind one small interface, or train one.

Accepted formats (all read offline, nothing is fetched from a hub):
- a Hugging Face `tokenizer.json` file, or a directory containing one;
- a SentencePiece `.model` file (Llama/Mistral style);
- a GPT-2 style directory holding `vocab.json` + `merges.txt`.

`train_bpe_tokenizer` trains a byte-level BPE with HF `tokenizers`. Training is
deterministic: the library breaks ties between equal-count merges by the pair itself, so
the same text gives a byte-identical `tokenizer.json` with any number of threads (checked
with RAYON_NUM_THREADS=1 and the default pool; tests/data/test_tokenizer.py guards it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"
# End-of-document candidates, in the order we trust them, for tokenizer.json files.
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")
_FORMATS = (
    "a Hugging Face tokenizer.json (file or directory containing it), "
    "a SentencePiece .model file, or a directory with GPT-2 style vocab.json + merges.txt"
)


class Tokenizer(ABC):
    """What the data pipeline and the model need from a tokenizer.

    `vocab_size` is max id + 1 including added special tokens: the number of rows an
    embedding or STEM table must have. `fingerprint` is a sha256 over the defining
    file(s), recorded by preprocessing so a different tokenizer of the same size is caught.
    """

    name: str
    vocab_size: int
    eod_id: int
    fingerprint: str

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"{kind}({self.name}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json, or GPT-2 vocab/merges built into one)."""

    def __init__(self, tok: HFTokenizer, name: str, fingerprint: str, eod_token: str | None = None):
        vocab = tok.get_vocab(with_added_tokens=True)
        if eod_token is None:
            eod_token = next((t for t in _EOD_CANDIDATES if t in vocab), None)
        if eod_token is None or eod_token not in vocab:
            raise ValueError(
                f"tokenizer {name} has no end-of-document token "
                f"(looked for {', '.join(_EOD_CANDIDATES)})"
            )
        # Document text must never turn into control tokens: a literal "<|endoftext|>" in a
        # web page is text; preprocessing appends the real eod id itself.
        tok.encode_special_tokens = True
        self._tok = tok
        self.name = name
        self.fingerprint = fingerprint
        self.vocab_size = max(vocab.values()) + 1
        self.eod_id = vocab[eod_token]

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no BOS/EOS from a post-processor; documents get eod explicitly.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"SentencePiece model {path} defines no eos piece to use as end-of-document"
            )
        self.name = f"sentencepiece:{path}"
        self.fingerprint = _sha256_files([path])
        self.vocab_size = self._sp.get_piece_size()
        self.eod_id = self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(list(ids))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from `path`; ValueError naming the path and the accepted formats."""
    p = Path(path)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    if p.is_file() and p.suffix == ".json" and p.name != "vocab.json":
        try:
            tok = HFTokenizer.from_file(str(p))
        except Exception as e:  # the library raises a bare Exception on parse errors
            raise ValueError(f"cannot read {p} as a Hugging Face tokenizer.json: {e}") from e
        return HuggingFaceTokenizer(tok, f"hf:{p}", _sha256_files([p]))
    if p.is_file() and p.suffix == ".model":
        try:
            return SentencePieceTokenizer(p)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"cannot read {p} as a SentencePiece model: {e}") from e
    if p.is_dir() and (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        return _load_gpt2(p)
    what = "does not exist" if not p.exists() else "is not a recognised tokenizer"
    raise ValueError(f"tokenizer path {path} {what}; expected {_FORMATS}")


def _load_gpt2(d: Path) -> HuggingFaceTokenizer:
    vocab, merges = d / "vocab.json", d / "merges.txt"
    try:
        tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise ValueError(f"cannot read GPT-2 vocab/merges in {d}: {e}") from e
    # GPT-2's byte-level scheme: no prefix space, byte-level decoding.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # <|endoftext|> is an ordinary vocab entry in vocab.json; registering it as special keeps
    # its existing id and lets the eod lookup find it.
    if EOD_TOKEN in tok.get_vocab():
        tok.add_special_tokens([EOD_TOKEN])
    return HuggingFaceTokenizer(tok, f"gpt2:{d}", _sha256_files([vocab, merges]))


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike
) -> Tokenizer:
    """Train a byte-level BPE with `<|endoftext|>` as eod; write tokenizer.json atomically."""
    if vocab_size < 257 + 1:
        raise ValueError(
            f"vocab_size {vocab_size} too small: a byte-level BPE needs 256 bytes + {EOD_TOKEN}"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out = Path(out_path)
    atomic_write_text(out, tok.to_str(pretty=True))
    return load_tokenizer(out)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()
