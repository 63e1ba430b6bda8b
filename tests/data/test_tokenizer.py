import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm
from tokenizers import ByteLevelBPETokenizer

from stem_megatron.data.tokenizer import EOD_TOKEN, load_tokenizer, train_bpe_tokenizer

SAMPLE = "Wherefore art thou, café 🙂?\n  Two  spaces and a tab\there."


def test_trained_bpe_round_trip_and_sizes(tok_path, texts):
    tok = load_tokenizer(tok_path)
    assert tok.vocab_size == 400
    assert tok.eod_id == 0  # the only special token is added first
    assert tok.name == f"hf:{tok_path}"
    for text in texts[:5] + [SAMPLE, ""]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(texts[:3]) == [tok.encode(t) for t in texts[:3]]
    # Merges were learned: fewer tokens than bytes on in-domain text.
    assert len(tok.encode(texts[0])) < 0.6 * len(texts[0].encode())


def test_literal_eod_text_is_not_a_control_token(tok_path):
    tok = load_tokenizer(tok_path)
    ids = tok.encode(f"end {EOD_TOKEN} start")
    assert tok.eod_id not in ids
    assert tok.decode(ids) == f"end {EOD_TOKEN} start"


def test_directory_with_tokenizer_json(tok_path):
    assert load_tokenizer(tok_path.parent).encode(SAMPLE) == load_tokenizer(tok_path).encode(SAMPLE)


def test_training_is_reproducible_across_runs_and_threads(tmp_path, texts):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    train_bpe_tokenizer(texts, 450, a)
    train_bpe_tokenizer(texts, 450, b)
    assert a.read_bytes() == b.read_bytes()
    # Another process with a single-threaded pool must produce the same bytes too.
    c = tmp_path / "c.json"
    code = (
        "import sys, json;"
        "from stem_megatron.data.tokenizer import train_bpe_tokenizer;"
        "train_bpe_tokenizer(json.load(open(sys.argv[1])), 450, sys.argv[2])"
    )
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "texts.json"), str(c)],
        check=True,
        env=env,
    )
    assert c.read_bytes() == a.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json",
        "b.json",
        "c.json",
        "texts.json",
    ]  # no temp files


def test_gpt2_vocab_and_merges(tmp_path, texts):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=380, special_tokens=[EOD_TOKEN], show_progress=False)
    bpe.save_model(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["merges.txt", "vocab.json"]
    tok = load_tokenizer(tmp_path)
    assert tok.name == f"gpt2:{tmp_path}"
    assert tok.eod_id == json.loads((tmp_path / "vocab.json").read_text())[EOD_TOKEN]
    assert tok.vocab_size == 380
    for text in texts[:3] + [SAMPLE]:
        ids = tok.encode(text)
        assert ids == bpe.encode(text).ids  # same BPE as the library's own GPT-2 style class
        assert tok.decode(ids) == text


def test_sentencepiece_model(tmp_path, texts):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=120,
        model_type="bpe",
        minloglevel=2,
    )
    tok = load_tokenizer(tmp_path / "sp.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert tok.vocab_size == 120
    assert tok.eod_id == sp.piece_to_id("</s>") == 2
    text = (
        "the man said thou hast been there"  # SentencePiece normalises whitespace; keep it simple
    )
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "and"]) == [ids, sp.encode("and")]


@pytest.mark.parametrize("name", ["missing.json", "notes.txt", "emptydir", "bad.json", "bad.model"])
def test_unknown_or_broken_formats_raise_value_error(tmp_path, name):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError) as e:
        load_tokenizer(tmp_path / name)
    assert str(tmp_path / name) in str(e.value)
    if name in ("missing.json", "notes.txt", "emptydir"):
        assert (
            "tokenizer.json" in str(e.value)
            and "SentencePiece" in str(e.value)
            and "merges.txt" in str(e.value)
        )


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(["abc"], 200, tmp_path / "t.json")
    assert not any(tmp_path.iterdir())
