"""On-the-fly knowledge editing: redirect the STEM lookups of an entity's tokens in a text.

`--stem-remap "Spain=Germany"` leaves the text (and so the embedding and attention) as it
is; wherever the tokens of "Spain" occur (spelled as inside a sentence; forms="both" also
matches the start-of-text spelling), the STEM tables are indexed by the tokens of "Germany"
instead, as in the paper. No weight changes. For a prompt, this is what a
checkpoint whose Spain rows were replaced by Germany's (tools/edit_knowledge.py
--copy "Spain=Germany", or --swap) computes. Only id-to-id rules apply here (strict, repeat,
pick); averaged rows exist only in an edited checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stem_megatron.data.tokenizer import Tokenizer
from stem_megatron.editing.entities import EditError, align, paired_forms, resolve_entity


@dataclass(frozen=True)
class StemRemap:
    """Token patterns and the lookup ids that replace them (same length), longest first."""

    patterns: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

    def __call__(self, ids: Sequence[int]) -> list[int]:
        """The STEM lookup ids of `ids`: every occurrence of a pattern, scanned left to right
        and without overlaps (the longest pattern wins at a position), is redirected."""
        out = list(ids)
        i = 0
        while i < len(ids):
            for pattern, lookup in self.patterns:
                if tuple(ids[i : i + len(pattern)]) == pattern:
                    out[i : i + len(pattern)] = lookup
                    i += len(pattern)
                    break
            else:
                i += 1
        return out


def parse_remap(
    tokenizer: Tokenizer,
    specs: Sequence[str],
    rule: str = "strict",
    pick: int = -1,
    forms: str = "inner",
) -> StemRemap:
    """StemRemap from "FROM=TO" specs (entities as in editing/entities.py)."""
    if rule == "average":
        raise EditError(
            "--stem-remap redirects lookups to existing rows, so the average rule "
            "cannot apply on the fly: use strict, repeat or pick, or write averaged "
            "rows into a checkpoint with tools/edit_knowledge.py"
        )
    patterns: dict[tuple[int, ...], tuple[int, ...]] = {}
    for spec in specs:
        dest_spec, sep, source_spec = spec.partition("=")
        if not sep or not dest_spec or not source_spec:
            raise EditError(f'--stem-remap {spec!r}: expected FROM=TO, e.g. "Spain=Germany"')
        dest = resolve_entity(tokenizer, dest_spec, forms)
        source = resolve_entity(tokenizer, source_spec, forms)
        for dest_ids, source_ids in paired_forms(dest, source):
            lookup = tuple(ids[0] for ids in align(dest_ids, source_ids, rule, pick))
            if patterns.get(dest_ids, lookup) != lookup:
                raise EditError(
                    f"--stem-remap {spec!r}: tokens {list(dest_ids)} are already "
                    "redirected elsewhere by an earlier --stem-remap"
                )
            patterns[dest_ids] = lookup
    ordered = sorted(patterns.items(), key=lambda item: -len(item[0]))
    return StemRemap(tuple(ordered))
