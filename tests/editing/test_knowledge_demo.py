"""The knowledge-editing demo pipeline end to end at toy size (the full run: make edit-demo)."""

from __future__ import annotations

import json

from stem_megatron.editing.facts import TEMPLATES, country_capitals, fact_documents
from tools import knowledge_demo

TOY = ["--countries", "16", "--steps", "3", "--repeats", "4", "--works", "0", "--vocab", "400",
       "--seq-length", "32", "--pairs", "2", "--pairs-from", "all", "--override",
       "model.hidden_size=32", "model.ffn_hidden_size=64", "model.make_vocab_size_divisible_by=64",
       "train.micro_batch_size=4", "train.global_batch_size=4"]


def test_fact_table_and_documents():
    facts = country_capitals()
    assert len(facts) > 150
    by_country = {f.country: f.capital for f in facts}
    assert by_country["France"] == "Paris" and by_country["Germany"] == "Berlin"
    docs = fact_documents(facts[:3], repeats=2, per_document=5, seed=0)
    text = " ".join(docs)
    assert sum(len(d.split(". ")) for d in docs) == 3 * 2 * len(TEMPLATES)
    assert text.count(facts[0].capital) == 2 * len(TEMPLATES)


def test_demo_pipeline_at_toy_size(tmp_path, capsys):
    out = tmp_path / "demo"
    assert knowledge_demo.main(["--out", str(out), *TOY]) == 0
    report = json.loads((out / "knowledge_demo.json").read_text())
    assert report["facts"] == 16 and 0 <= report["learned"] <= 16
    rows = report["results"]
    assert rows and all(0 <= r["edit_success"] <= 1 and 0 <= r["locality"] <= 1 for r in rows)
    assert {r["layers"] for r in rows} >= {"all STEM layers", "lower half", "upper half",
                                           "on the fly (--stem-remap)"}
    # Swapping single-token rows in every STEM layer and redirecting their lookups on the fly
    # are the same computation: the answers, and so both figures, agree exactly.
    single = {r["layers"]: r for r in rows if r["entities"].startswith("single")}
    for key in ("edit_success", "locality"):
        assert single["all STEM layers"][key] == single["on the fly (--stem-remap)"][key]
    assert "edit success" in capsys.readouterr().out
    assert knowledge_demo.main(["--out", str(out), *TOY]) == 1  # never overwrites a report
