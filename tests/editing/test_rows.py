"""Entities, multi-token rules, row plans and on-the-fly remaps, on a real trained tokenizer."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.editing.entities import (
    EditError,
    Entity,
    StrictLengthError,
    align,
    resolve_entity,
)
from stem_megatron.editing.remap import parse_remap
from stem_megatron.editing.rows import apply_plan, build_plan


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    return load_tokenizer(small_corpus["tokenizer"])


def ent(ids: tuple[int, ...], spec: str = "x") -> Entity:
    return Entity(spec, (ids,))


@pytest.mark.parametrize(
    "rule,dest,source,expected",
    [
        ("strict", (1, 2), (7, 8), [(7,), (8,)]),
        ("repeat", (1, 2, 3), (7,), [(7,), (7,), (7,)]),
        ("repeat", (1, 2, 3), (7, 8), [(7,), (8,), (8,)]),
        ("repeat", (1,), (7, 8, 9), [(9,)]),
        ("repeat", (1, 2), (7, 8, 9), [(8,), (9,)]),
        ("pick", (1, 2), (7, 8, 9), [(9,), (9,)]),
        ("average", (1, 2), (7, 8, 9), [(7, 8, 9), (7, 8, 9)]),
    ],
)
def test_alignment_rules(rule, dest, source, expected):
    assert align(dest, source, rule) == expected


def test_strict_rule_refuses_different_lengths():
    # No flag in the message: each tool names its own option for the rule.
    with pytest.raises(
        StrictLengthError,
        match=r"\(2 tokens\) vs \[7\] \(1 tokens\) and the strict "
        r"rule needs equal lengths$",
    ):
        align((1, 2), (7,), "strict")
    with pytest.raises(EditError, match="pick index 5"):
        align((1,), (7, 8), "pick", pick=5)


def test_plans_read_every_source_before_writing():
    table = torch.arange(40, dtype=torch.float32).view(10, 4)
    exp_avg, exp_avg_sq = table * 0.1, table * 0.01
    before = [t.clone() for t in (table, exp_avg, exp_avg_sq)]
    apply_plan(build_plan("swap", [ent((1, 2)), ent((5, 6))]), [table, exp_avg, exp_avg_sq])
    for new, old in zip((table, exp_avg, exp_avg_sq), before):
        assert torch.equal(new[[1, 2, 5, 6]], old[[5, 6, 1, 2]])  # moments move with rows
        assert torch.equal(new[[0, 3, 4, 7, 8, 9]], old[[0, 3, 4, 7, 8, 9]])


def test_copy_average_and_inject():
    base = torch.randn(10, 3)
    t = base.clone()
    apply_plan(build_plan("copy", [ent((1,)), ent((4,))]), [t])
    assert torch.equal(t[1], base[4]) and torch.equal(t[4], base[4])
    t = base.clone()
    apply_plan(build_plan("average", [ent((1,)), ent((2,)), ent((3,))]), [t])
    for row in (1, 2, 3):
        torch.testing.assert_close(t[row], base[1:4].mean(0))
    t = base.clone()
    apply_plan(build_plan("inject", [ent((9,)), ent((2,)), ent((4, 5))], rule="average"), [t])
    torch.testing.assert_close(t[9], (base[2] + (base[4] + base[5]) / 2) / 2)
    assert torch.equal(t[:9], base[:9])


def test_conflicting_destinations_are_refused():
    with pytest.raises(EditError, match="two different rows"):
        build_plan("swap", [ent((1, 2)), ent((2, 3))])
    with pytest.raises(EditError, match="exactly 2"):
        build_plan("swap", [ent((1,)), ent((2,)), ent((3,))])


def test_entities_from_text_and_ids(tokenizer):
    romeo = resolve_entity(tokenizer, "Romeo")
    assert romeo.forms == (tuple(tokenizer.encode(" Romeo")),)
    both = resolve_entity(tokenizer, "Romeo", forms="both")
    assert both.forms == (tuple(tokenizer.encode(" Romeo")), tuple(tokenizer.encode("Romeo")))
    assert resolve_entity(tokenizer, "id:5,7").forms == ((5, 7),)
    with pytest.raises(EditError, match="not in the vocabulary"):
        resolve_entity(tokenizer, f"id:{tokenizer.vocab_size}")
    with pytest.raises(EditError, match="empty"):
        resolve_entity(tokenizer, "  ")
    with pytest.raises(EditError, match="both as text or both as token ids"):
        build_plan("copy", [both, resolve_entity(tokenizer, "id:5")])


def test_text_a_sentencepiece_vocabulary_cannot_spell_is_refused(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("the capital of spain is madrid\nthe capital of france is paris\n" * 50)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=20, minloglevel=2
    )
    sp = load_tokenizer(tmp_path / "sp.model")
    assert resolve_entity(sp, "spain").forms == (tuple(sp.encode("spain")),)
    with pytest.raises(EditError, match="not in the tokenizer's vocabulary"):
        resolve_entity(sp, "Zürich")


def test_remap_redirects_every_occurrence_and_nothing_else(tokenizer):
    remap = parse_remap(tokenizer, ["Romeo=Juliet"], rule="repeat")
    romeo, juliet = tokenizer.encode(" Romeo"), tokenizer.encode(" Juliet")
    ids = tokenizer.encode("O Romeo, Romeo, wherefore art thou Romeo")
    lookup = remap(ids)
    assert len(lookup) == len(ids)
    starts = [i for i in range(len(ids)) if ids[i : i + len(romeo)] == romeo]
    assert len(starts) == 3
    expected = list(ids)
    for s in starts:
        expected[s : s + len(romeo)] = [
            ids_[0] for ids_ in align(tuple(romeo), tuple(juliet), "repeat")
        ]
    assert lookup == expected
    with pytest.raises(EditError, match="average rule"):
        parse_remap(tokenizer, ["Romeo=Juliet"], rule="average")
    with pytest.raises(EditError, match="FROM=TO"):
        parse_remap(tokenizer, ["Romeo"])


def test_command_line_edit_syntax():
    from stem_megatron.editing.edit import EditSpec

    assert EditSpec.parse("swap", "Spain=Germany").entities == ("Spain", "Germany")
    assert EditSpec.parse("copy", "Spain=Germany").entities == ("Spain", "Germany")
    assert EditSpec.parse("average", "Spain+France+Italy").entities == ("Spain", "France", "Italy")
    assert EditSpec.parse("inject", "Atlantis=Greece+Crete").entities == (
        "Atlantis",
        "Greece",
        "Crete",
    )
    for operation, text in [
        ("swap", "Spain"),
        ("swap", "A=B+C"),
        ("copy", "=B"),
        ("average", "Spain"),
        ("inject", "X="),
    ]:
        with pytest.raises(EditError, match="expected"):
            EditSpec.parse(operation, text)
