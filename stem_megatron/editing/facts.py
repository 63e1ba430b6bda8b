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
from stem_megatron.generation import StemIds, generate_ids

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
    return sorted((f for f in facts.values() if capitals.count(f.capital) == 1),
                  key=lambda f: f.country)


def fact_documents(facts: Sequence[Fact], repeats: int, per_document: int, seed: int) -> list[str]:
    """Each fact `repeats` times in every template, shuffled into documents of
    `per_document` sentences."""
    rng = random.Random(seed)
    sentences = [t.format(country=f.country, capital=f.capital)
                 for f in facts for t in TEMPLATES for _ in range(repeats)]
    rng.shuffle(sentences)
    return [" ".join(sentences[i:i + per_document]) for i in range(0, len(sentences), per_document)]


@torch.no_grad()
def answers(model: torch.nn.Module, tokenizer: Tokenizer, facts: Sequence[Fact],
            stem_ids: StemIds | None = None) -> dict[str, tuple[int, ...]]:
    """country -> the greedy continuation of its probe, as long as the longest capital."""
    spec = model.spec
    n = max(len(capital_ids(tokenizer, fact)) for fact in facts)
    out = {}
    for fact in facts:
        prompt = tokenizer.encode(PROBE.format(country=fact.country))
        ids = generate_ids(model, prompt, max_new_tokens=n, vocab_size=spec.vocab_size,
                           seq_length=spec.model.seq_length, stem_ids=stem_ids)
        out[fact.country] = tuple(ids[len(prompt):])
    return out


def capital_ids(tokenizer: Tokenizer, fact: Fact) -> tuple[int, ...]:
    return tuple(tokenizer.encode(" " + fact.capital))
