"""Row edits of STEM tables: swap, copy, average and inject, as plans applied to row tensors.

An edit is first turned into a `RowPlan`: for each destination row (token id), the weighted
source rows it becomes. Every source row is read from the table as it was before the edit
(a swap reads both sides first), and a destination given two different values is an error.
The plan is then applied, row by row, to every tensor whose rows belong to the table: the
table itself and its optimizer state (AdamW's exp_avg and exp_avg_sq), so a swapped row
keeps its own moments when training continues from the edited state. A plain copy moves
values bit for bit; a mean of rows takes the same mean of their moments.

    swap     A <-> B              rows of A become B's and rows of B become A's
    copy     A = B                rows of A become B's (B unchanged)
    average  A + B + ...          every listed entity gets the mean of all of them
    inject   A = B + C + ...      rows of A become the mean of the sources' rows
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from stem_megatron.editing.entities import EditError, Entity, align, paired_forms
from stem_megatron.editing.spec import OPERATIONS

# destination row -> ((source row, weight), ...)
RowPlan = dict[int, tuple[tuple[int, float], ...]]


def _mean(ids: Sequence[int]) -> dict[int, float]:
    weights: dict[int, float] = {}
    for i in ids:
        weights[i] = weights.get(i, 0.0) + 1.0 / len(ids)
    return weights


def _blend(parts: Sequence[Mapping[int, float]]) -> tuple[tuple[int, float], ...]:
    """The equal-weight mean of several weighted row sets."""
    total: dict[int, float] = {}
    for part in parts:
        for row, weight in part.items():
            total[row] = total.get(row, 0.0) + weight / len(parts)
    return tuple(sorted(total.items()))


def _assign(plan: RowPlan, dest: int, value: tuple[tuple[int, float], ...], what: str) -> None:
    if value == ((dest, 1.0),):
        value = plan.get(dest, value)  # a row that keeps itself does not conflict
    if dest in plan and plan[dest] != value:
        raise EditError(
            f"{what}: token id {dest} would be given two different rows (the "
            "entities share this token); edit them in separate steps"
        )
    plan[dest] = value


def _take_from(
    plan: RowPlan, dest: Entity, sources: Sequence[Entity], rule: str, pick: int, what: str
) -> None:
    """Rows of `dest` become the mean over `sources` of their rows aligned to dest's length."""
    for form in range(len(dest.forms)):
        dest_ids = dest.forms[form]
        aligned = []
        for source in sources:
            pairs = paired_forms(dest, source)
            aligned.append(align(dest_ids, pairs[form][1], rule, pick))
        for pos, row in enumerate(dest_ids):
            _assign(plan, row, _blend([_mean(a[pos]) for a in aligned]), what)


def build_plan(
    operation: str, entities: Sequence[Entity], rule: str = "strict", pick: int = -1
) -> RowPlan:
    """The plan of one edit. `entities`: swap [A, B]; copy [A, B] (A takes B's rows);
    average [A, B, ...]; inject [A, B, ...] (A takes the mean of the others)."""
    what = f"{operation} {' '.join(e.spec for e in entities)}"
    if operation not in OPERATIONS:
        raise EditError(f"unknown edit {operation!r}; choose one of {', '.join(OPERATIONS)}")
    needed = {"swap": (2, 2), "copy": (2, 2), "average": (2, None), "inject": (2, None)}[operation]
    if len(entities) < needed[0] or (needed[1] is not None and len(entities) > needed[1]):
        raise EditError(
            f"{what}: {operation} takes {'exactly 2' if needed[1] else 'at least 2'} "
            f"entities, got {len(entities)}"
        )
    plan: RowPlan = {}
    if operation == "swap":
        a, b = entities
        _take_from(plan, a, [b], rule, pick, what)
        _take_from(plan, b, [a], rule, pick, what)
    elif operation == "average":
        for dest in entities:
            _take_from(plan, dest, entities, rule, pick, what)
    else:  # copy and inject: the first entity takes the others' rows
        _take_from(plan, entities[0], entities[1:], rule, pick, what)
    return {dest: value for dest, value in plan.items() if value != ((dest, 1.0),)}


@torch.no_grad()
def apply_plan(plan: RowPlan, tensors: Iterable[torch.Tensor]) -> None:
    """Apply `plan` in place to each tensor ([vocab, ...], rows = token ids): the table and
    the optimizer states that belong to its rows. Sources are read before anything is written."""
    if not plan:
        return
    dests = sorted(plan)
    for tensor in tensors:
        rows = []
        for dest in dests:
            sources = plan[dest]
            if len(sources) == 1 and sources[0][1] == 1.0:
                rows.append(tensor[sources[0][0]].clone())  # a copy, bit for bit
            else:
                mean = sum(tensor[row].double() * weight for row, weight in sources)
                rows.append(mean.to(tensor.dtype))
        index = torch.tensor(dests, device=tensor.device)
        tensor.index_copy_(0, index, torch.stack(rows))
