"""The knowledge-editing demo: its scores on planted answers, the pipeline end to end at toy
size (where nothing is learned), and a size where facts are learned (slow; the full run:
make edit-demo)."""

from __future__ import annotations

import json

import pytest

from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.editing.facts import TEMPLATES, capital_ids, country_capitals, fact_documents
from tools import knowledge_demo

TOY = [
    "--countries",
    "16",
    "--steps",
    "3",
    "--repeats",
    "4",
    "--works",
    "0",
    "--vocab",
    "400",
    "--seq-length",
    "32",
    "--pairs",
    "2",
    "--pairs-from",
    "all",
    "--override",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.make_vocab_size_divisible_by=64",
    "train.micro_batch_size=4",
    "train.global_batch_size=4",
]


def test_fact_table_and_documents():
    facts = country_capitals()
    assert len(facts) > 150
    by_country = {f.country: f.capital for f in facts}
    assert by_country["France"] == "Paris" and by_country["Germany"] == "Berlin"
    docs = fact_documents(facts[:3], repeats=2, per_document=5, seed=0)
    text = " ".join(docs)
    assert sum(len(d.split(". ")) for d in docs) == 3 * 2 * len(TEMPLATES)
    assert text.count(facts[0].capital) == 2 * len(TEMPLATES)


def test_scores_on_planted_answers(small_corpus):
    """One pair swapped: one probe answers its partner's capital, the other neither its
    partner's nor its own; one of the four unrelated probes changed its answer."""
    tok = load_tokenizer(small_corpus["tokenizer"])
    facts = {f.country: f for f in country_capitals()[:6]}
    a, b, *others = facts
    before = {c: capital_ids(tok, f) + (7,) for c, f in facts.items()}  # answers run on
    after = dict(
        before, **{a: capital_ids(tok, facts[b]), b: before[others[1]], others[0]: before[a]}
    )
    assert before[a][: len(before[others[0]])] != before[others[0]]  # a real change
    assert knowledge_demo.score(after, before, facts, tok, [(a, b)]) == {
        "edit_success": 0.5,
        "edited_probes": 2,
        "still_own_capital": 0.0,
        "locality": 0.75,
        "unrelated_probes": 4,
    }


def test_demo_pipeline_at_toy_size(tmp_path, capsys):
    out = tmp_path / "demo"
    assert knowledge_demo.main(["--out", str(out), *TOY]) == 0
    report = json.loads((out / "knowledge_demo.json").read_text())
    assert report["facts"] == 16 and 0 <= report["learned"] <= 16
    rows = report["results"]
    assert rows and all(0 <= r["edit_success"] <= 1 and 0 <= r["locality"] <= 1 for r in rows)
    assert {r["layers"] for r in rows} >= {
        "all STEM layers",
        "lower half",
        "upper half",
        "on the fly (--stem-remap)",
    }
    # Swapping single-token rows in every STEM layer and redirecting their lookups on the fly
    # are the same computation: the answers, and so both figures, agree exactly.
    single = {r["layers"]: r for r in rows if r["entities"].startswith("single")}
    for key in ("edit_success", "locality"):
        assert single["all STEM layers"][key] == single["on the fly (--stem-remap)"][key]
    assert "edit success" in capsys.readouterr().out
    assert knowledge_demo.main(["--out", str(out), *TOY]) == 1  # never overwrites a report


@pytest.mark.slow
def test_demo_learns_facts_and_the_edits_move_them(tmp_path):
    """Large enough to learn some facts (4 of 16; 95 s on 2 CPU cores): swapped
    single-token rows move answers, on the fly exactly as in the weights, and leave every
    other probe as it was."""
    learned = [
        "--countries",
        "16",
        "--steps",
        "120",
        "--repeats",
        "4",
        "--works",
        "0",
        "--vocab",
        "400",
        "--seq-length",
        "32",
        "--pairs",
        "2",
        "--pairs-from",
        "all",
        "--override",
        "model.hidden_size=64",
        "model.ffn_hidden_size=128",
        "model.make_vocab_size_divisible_by=64",
        "train.micro_batch_size=4",
        "train.global_batch_size=4",
        "optim.lr=0.01",
        "stem.optimizer.lr=0.03",
    ]
    assert knowledge_demo.main(["--out", str(tmp_path / "demo"), *learned]) == 0
    report = json.loads((tmp_path / "demo" / "knowledge_demo.json").read_text())
    assert report["learned"] > 0
    single = {r["layers"]: r for r in report["results"] if r["entities"].startswith("single")}
    assert single["all STEM layers"]["edit_success"] > 0
    assert single["all STEM layers"] == {
        **single["on the fly (--stem-remap)"],
        "layers": "all STEM layers",
    }
    assert all(r["locality"] == 1 for r in single.values())
