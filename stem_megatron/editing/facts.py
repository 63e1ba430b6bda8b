"""Fact sentences from a public fact table, and greedy probing of what a model answers.

The table is country -> capital from the `countryinfo` package (MIT; one JSON per country).
Training text states each fact in several templates; a probe asks with the first one and
reads the greedy continuation, as many tokens as the capital has.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stem_megatron.data.tokenizer import Tokenizer
from stem_megatron.generation import StemIds

TEMPLATES = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "In {country}, the capital city is {capital}.",
    "The capital city of {country} is {capital}.",
)
PROBE = "The capital of {country} is"


@dataclass(frozen=True)
class Fact:
    country: str
    capital: str


def country_capitals() -> list[Fact]:
    """Countries with one plain capital, sorted by name. Dropped: no capital, several
    capitals ("A / B"), a capital named like its country (Singapore, Monaco: a swap could
    not tell the answers apart) and capitals shared by two entries."""
    import countryinfo

    facts: dict[str, Fact] = {}
    for info in countryinfo.all_countries():
        try:
            country, capital = info.name(), info.capital()
        except Exception:  # the package raises on entries without the field
            continue
        if not isinstance(capital, str) or not country or not capital or "/" in capital:
            continue
        if capital in country or country in capital:
            continue
        facts[country] = Fact(country, capital)
    capitals = [f.capital for f in facts.values()]
    return sorted(
        (f for f in facts.values() if capitals.count(f.capital) == 1), key=lambda f: f.country
    )


def fact_documents(facts: Sequence[Fact], repeats: int, per_document: int, seed: int) -> list[str]:
    """Each fact `repeats` times in every template, shuffled into documents of
    `per_document` sentences."""
    rng = random.Random(seed)
    sentences = [
        t.format(country=f.country, capital=f.capital)
        for f in facts
        for t in TEMPLATES
        for _ in range(repeats)
    ]
    rng.shuffle(sentences)
    return [
        " ".join(sentences[i : i + per_document]) for i in range(0, len(sentences), per_document)
    ]


@torch.no_grad()
def answers(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    facts: Sequence[Fact],
    stem_ids: StemIds | None = None,
) -> dict[str, tuple[int, ...]]:
    """country -> the greedy continuation of its probe, as long as the longest capital.

    Probes of equal token length run as one batch (no padding, so every row computes what
    it would alone); greedy decoding as in generation.generate_ids."""
    spec = model.spec
    vocab_size = min(spec.vocab_size, tokenizer.vocab_size)  # only ids the tokenizer decodes
    n = max(len(capital_ids(tokenizer, fact)) for fact in facts)
    groups: dict[int, list[tuple[str, list[int]]]] = {}
    for fact in facts:
        prompt = tokenizer.encode(PROBE.format(country=fact.country))
        groups.setdefault(len(prompt), []).append((fact.country, prompt))
    was_training = model.training
    model.eval()
    out = {}
    try:
        for length, probes in groups.items():
            ids = torch.tensor([prompt for _, prompt in probes])
            for _ in range(n):
                window = ids[:, -spec.model.seq_length :]
                lookup = (
                    None
                    if stem_ids is None
                    else torch.tensor([stem_ids(row) for row in window.tolist()])
                )
                logits = model(window, stem_ids=lookup)[:, -1, :vocab_size]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            out.update(
                {country: tuple(row[length:]) for (country, _), row in zip(probes, ids.tolist())}
            )
    finally:
        model.train(was_training)
    return out


def capital_ids(tokenizer: Tokenizer, fact: Fact) -> tuple[int, ...]:
    return tuple(tokenizer.encode(" " + fact.capital))
