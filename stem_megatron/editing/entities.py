"""Entities to edit, as token ids, and how two entities of different token lengths line up.

An entity is a text string ("Spain", "New Zealand") or explicit token ids ("id:812" or
"id:812,77"). A byte-level BPE gives a word different tokens inside a sentence (after a
space: `ĠSpain`) and at the very start of a text (`Spain`, often split into pieces). Text
entities are tokenized as they occur inside a sentence (`forms="inner"`, the default: a
leading space is added unless the string has one), which is where names occur in running
text; `forms="both"` also edits the start-of-text form. Forms pair up by kind: the inner
form of one entity with the inner form of the other.

When the entity whose rows are replaced (the destination, n tokens) and the entity whose
rows are used (the source, m tokens) differ in length, a rule says which source rows each of
the n destination tokens gets (see `align`):

    strict   lengths must match; token i takes source token i (the default)
    repeat   the source tokens are stretched (repeated) or thinned out over the n positions,
             keeping their order and always ending on the last source token
    pick     every destination token takes one source token (`pick` index, default -1: the last)
    average  every destination token takes the mean of all the source tokens' rows

`strict`, `repeat` and `pick` map token ids to token ids, so they also work on the fly
(generation with redirected lookups); `average` makes rows no token has, so it needs a
checkpoint edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stem_megatron.data.tokenizer import Tokenizer

RULES = ("strict", "repeat", "pick", "average")
FORMS = ("inner", "both")
ID_PREFIX = "id:"


class EditError(ValueError):
    """An edit that cannot be done as asked: the message names the input and the fix."""


class StrictLengthError(EditError):
    """The strict rule met entities of different token lengths. The message names no flag:
    each tool adds how to choose another rule with its own option and values."""


@dataclass(frozen=True)
class Entity:
    spec: str  # as the user wrote it
    forms: tuple[tuple[int, ...], ...]  # token ids of each surface form


def resolve_entity(tokenizer: Tokenizer, spec: str, forms: str = "inner") -> Entity:
    """The token ids of `spec` (text or "id:N[,M...]") in the surface `forms` ("inner" or
    "both"); EditError if the tokenizer cannot represent it exactly."""
    if spec.startswith(ID_PREFIX):
        return Entity(spec, (_parse_ids(spec, tokenizer.vocab_size),))
    if not spec.strip():
        raise EditError(f"entity {spec!r} is empty: give a word or token ids as id:N[,M...]")
    if forms not in FORMS:
        raise EditError(f"unknown forms {forms!r}; choose one of {', '.join(FORMS)}")
    inner = spec if spec[0].isspace() else " " + spec
    texts = [inner] if forms == "inner" or inner == spec else [inner, spec]
    resolved: list[tuple[int, ...]] = []
    for text in texts:
        ids = tuple(tokenizer.encode(text))
        # Compared without outer spaces: SentencePiece decodes its word-initial "▁" to nothing.
        if not ids or tokenizer.decode(ids).strip() != text.strip():
            raise EditError(
                f"entity {spec!r} is not in the tokenizer's vocabulary: {text!r} encodes to "
                f"{list(ids)}, which decodes to {tokenizer.decode(ids)!r}; use text the "
                "tokenizer represents exactly, or token ids as id:N[,M...]"
            )
        if ids not in resolved:  # SentencePiece: both forms are the same tokens
            resolved.append(ids)
    return Entity(spec, tuple(resolved))


def _parse_ids(spec: str, vocab_size: int) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in spec[len(ID_PREFIX) :].split(","))
    except ValueError:
        raise EditError(
            f"entity {spec!r}: token ids must be integers, as id:812 or id:812,77"
        ) from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise EditError(
            f"entity {spec!r}: token ids {bad} are not in the vocabulary (ids 0..{vocab_size - 1})"
        )
    return ids


def paired_forms(dest: Entity, source: Entity) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(destination ids, source ids) for each surface form, paired by kind."""
    if len(dest.forms) != len(source.forms):
        raise EditError(
            f"cannot pair {dest.spec!r} with {source.spec!r}: they have different "
            "surface forms (text vs token ids, or one starting with a space); give "
            "both as text or both as token ids (id:N)"
        )
    return list(zip(dest.forms, source.forms))


def align(
    dest: tuple[int, ...], source: tuple[int, ...], rule: str, pick: int = -1
) -> list[tuple[int, ...]]:
    """For each destination token, the source token ids whose rows it takes (mean if several)."""
    n, m = len(dest), len(source)
    if rule not in RULES:
        raise EditError(f"unknown multi-token rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "strict":
        if n != m:
            raise StrictLengthError(
                f"token lengths differ: {list(dest)} ({n} tokens) vs {list(source)} ({m} tokens) "
                "and the strict rule needs equal lengths"
            )
        return [(s,) for s in source]
    if rule == "repeat":
        # Position i covers the fraction (i, i + 1] / n of the source; take the source token
        # at the end of that span, so the last position always gets the last source token.
        return [(source[math.ceil((i + 1) * m / n) - 1],) for i in range(n)]
    if rule == "pick":
        if not -m <= pick < m:
            raise EditError(f"pick index {pick} is outside the source {list(source)} ({m} tokens)")
        return [(source[pick],)] * n
    return [tuple(source)] * n
