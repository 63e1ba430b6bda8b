import gzip
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from stem_megatron.cli.preprocess_data import main, preprocess, split_documents
from stem_megatron.data.indexed import open_dataset
from stem_megatron.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jsonl(path, docs, key="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, key: d}) + "\n")
    return path


@pytest.fixture()
def inputs(tmp_path, texts):
    """Four inputs, one of each kind: 2 .txt documents + 30 + 20 + 8 jsonl documents."""
    (tmp_path / "a.txt").write_text(texts[0], encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(texts[1])
    return [
        tmp_path / "a.txt",
        tmp_path / "b.txt.gz",
        _jsonl(tmp_path / "c.jsonl", texts[2:32]),
        _jsonl(tmp_path / "d.jsonl.xz", texts[32:52], opener=lzma.open),
        _jsonl(tmp_path / "e.jsonl.gz", texts[52:60], opener=gzip.open),
    ]


def _documents(prefix):
    return [d.tolist() for d in IndexedDataset(prefix)]


def test_round_trip_and_split(tmp_path, inputs, tok_path, texts):
    out = tmp_path / "out" / "corpus"
    result = preprocess(inputs, tok_path, out, val_fraction=0.1, seed=7)
    tok = load_tokenizer(tok_path)
    is_val = split_documents(60, 0.1, 7)
    assert is_val.sum() == 6
    assert result["documents"] == {"train": 54, "val": 6}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        prefix = f"{out}_{split}"
        docs = _documents(prefix)
        want = [t for t, m in zip(texts, mask) if m]  # order of the inputs is kept within a split
        assert len(docs) == len(want)
        for ids, text in zip(docs, want):
            assert ids[-1] == tok.eod_id
            assert tok.decode(ids[:-1]) == text
        ds = open_dataset(prefix, vocab_size=tok.vocab_size)
        assert ds.num_tokens == result["tokens"][split] == sum(len(tok.encode(t)) + 1 for t in want)
        assert ds.meta["split"] == split and ds.meta["seed"] == 7
        assert ds.meta["sources"] == [str(p) for p in inputs]
    assert sorted(os.listdir(out.parent)) == sorted(
        f"corpus_{s}.{e}" for s in ("train", "val") for e in ("bin", "idx", "meta.json")
    )


def test_split_is_seeded_and_never_empty():
    a, b, c = (split_documents(100, 0.05, s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert a.sum() == c.sum() == 5 and not np.array_equal(a, c)
    for n in (2, 3, 10):
        mask = split_documents(n, 0.01, 0)
        assert mask.sum() == 1
    assert split_documents(2, 0.9, 0).sum() == 1  # train keeps one too
    assert split_documents(5, 0.0, 0).sum() == 0
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(1, 0.1, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_documents(10, 1.0, 0)


def test_bad_json_line_names_file_and_line_and_leaves_nothing(tmp_path, inputs, tok_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken\n')
    out = tmp_path / "out" / "c"
    with pytest.raises(ValueError) as e:
        preprocess(inputs + [bad], tok_path, out)  # fails after the good inputs were tokenized
    assert str(e.value).startswith(f"{bad}:4: bad JSON")
    assert os.listdir(out.parent) == []  # no half dataset, no temp files


def test_missing_json_key(tmp_path, tok_path):
    path = _jsonl(tmp_path / "x.jsonl", ["a", "b"], key="body")
    with pytest.raises(
        ValueError, match=r"x\.jsonl:1: no field 'text' \(found \['body', 'id'\]\); set --json-key"
    ):
        preprocess([path], tok_path, tmp_path / "o")
    result = preprocess([path], tok_path, tmp_path / "o", json_key="body")
    assert result["documents"] == {"train": 1, "val": 1}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.md", b"# hi", "unsupported input"),
        ("broken.jsonl.xz", b"not xz data", "cannot read as UTF-8 .jsonl.xz"),
        ("latin1.txt", "café".encode("latin-1"), "cannot read as UTF-8 .txt"),
    ],
)
def test_bad_input_files(tmp_path, tok_path, texts, name, content, message):
    good = tmp_path / "good.txt"
    good.write_text(texts[0])
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        preprocess([good, tmp_path / name], tok_path, tmp_path / "out" / "c")
    assert str(tmp_path / name) in str(e.value)


@pytest.mark.parametrize("content", ["café".encode("latin-1"), bytes(range(256)) * 4])
def test_a_lone_non_utf8_txt_reports_the_encoding_not_the_split(tmp_path, tok_path, content):
    # One .txt is one document: the split check used to fire before the file was decoded.
    path = tmp_path / "one.txt"
    path.write_bytes(content)
    with pytest.raises(
        ValueError, match=r"one\.txt: cannot read as UTF-8 \.txt: .*iconv -f latin1"
    ):
        preprocess([path], tok_path, tmp_path / "out")


def test_a_non_string_field_names_its_type_and_line(tmp_path, tok_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 42}\n')
    with pytest.raises(
        ValueError, match=r"n\.jsonl:2: field 'text' holds 42 \(type int\), not a string$"
    ):
        preprocess([path], tok_path, tmp_path / "out", val_fraction=0.0)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", "no text in .*empty.txt: every document is empty"),
        ("blank.jsonl", "\n\n", "no documents in .*blank.jsonl: every input is empty"),
        ("hollow.jsonl", '{"text": ""}\n', "no text in .*hollow.jsonl: every document is empty"),
    ],
)
def test_empty_input_is_refused_and_writes_nothing(tmp_path, tok_path, name, content, message):
    (tmp_path / name).write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=message):
        preprocess([tmp_path / name], tok_path, out / "c", val_fraction=0.0)
    assert os.listdir(out) == []


def test_refuses_to_overwrite_unless_asked(tmp_path, inputs, tok_path):
    out = tmp_path / "c"
    first = preprocess(inputs, tok_path, out)
    before = (tmp_path / "c_train.bin").read_bytes()
    with pytest.raises(FileExistsError, match=r"c_train\.bin.*--overwrite"):
        preprocess(inputs, tok_path, out)
    again = preprocess(inputs[2:], tok_path, out, overwrite=True)
    assert again["documents"]["train"] < first["documents"]["train"]
    assert (tmp_path / "c_train.bin").read_bytes() != before
    assert open_dataset(f"{out}_train").meta["num_documents"] == again["documents"]["train"]


def test_cli_exit_codes_and_summary(tmp_path, inputs, tok_path, capsys):
    args = [
        "--input",
        *map(str, inputs),
        "--tokenizer",
        str(tok_path),
        "--output-prefix",
        str(tmp_path / "c"),
    ]
    assert main(args + ["--val-fraction", "0.05"]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("preprocessed 60 documents,")
        and "train 57 docs" in out
        and "val 3 docs" in out
    )
    assert main(args) == 1
    assert "error: output exists" in capsys.readouterr().err
    assert (
        main(
            [
                "--input",
                str(tmp_path / "nope.txt"),
                "--tokenizer",
                str(tok_path),
                "--output-prefix",
                str(tmp_path / "d"),
            ]
        )
        == 1
    )
    assert "nope.txt: input file does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "--input",
                str(inputs[0]),
                "--tokenizer",
                str(tmp_path),
                "--output-prefix",
                str(tmp_path / "d"),
            ]
        )
        == 1
    )
    assert "is not a recognised tokenizer" in capsys.readouterr().err


def test_script_runs_from_repo_root(tmp_path, inputs, tok_path):
    cmd = [
        sys.executable,
        "tools/preprocess_data.py",
        "--input",
        str(inputs[2]),
        "--tokenizer",
        str(tok_path),
        "--output-prefix",
        str(tmp_path / "s"),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("preprocessed 30 documents")
    assert "tokenize" not in run.stderr  # no progress bar when stderr is not a terminal
