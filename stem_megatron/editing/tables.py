"""Where the rows of each STEM layer live in a checkpoint, and which layers an edit touches.

A checkpoint (checkpoint/model_state.py) stores every table as its full [vocab, d_ff] tensor,
whatever the TP/DP layout it was trained under:

    model.decoder.layers.<L>.mlp.stem_table.weight
    stem_optim.tables.decoder.layers.<L>.mlp.stem_table.exp_avg       (rows = token ids)
    stem_optim.tables.decoder.layers.<L>.mlp.stem_table.exp_avg_sq

Exact mode keeps a per-row "settled at step" in memory, but a checkpoint holds none:
`SparseRowAdamW.state_dict()` settles every row before a save (training/state.py), so each
row is current at the saved step and loading marks all rows settled there. The edit then
only has to move the two moment tensors with their rows. A checkpoint holding any other
per-row table state would need its own rule, so it is refused rather than left behind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from stem_megatron.editing.entities import EditError

_TABLE = re.compile(r"model\.decoder\.layers\.(\d+)\.mlp\.stem_table\.weight")
OPTIM_PREFIX = "stem_optim.tables.decoder.layers.{layer}.mlp.stem_table."
ROW_STATES = ("exp_avg", "exp_avg_sq")


def table_key(layer: int) -> str:
    return f"model.decoder.layers.{layer}.mlp.stem_table.weight"


def table_layers(keys: Iterable[str]) -> list[int]:
    """The STEM layers of a checkpoint, from its tensor keys."""
    return sorted(int(m.group(1)) for key in keys if (m := _TABLE.fullmatch(key)))


def row_keys(keys: Iterable[str], layers: Sequence[int]) -> dict[int, list[str]]:
    """For each layer, the keys of every tensor whose rows are token ids: the table, then its
    optimizer moments (absent in a weights-only checkpoint)."""
    keys = set(keys)
    out = {}
    for layer in layers:
        prefix = OPTIM_PREFIX.format(layer=layer)
        states = sorted(k[len(prefix) :] for k in keys if k.startswith(prefix))
        unknown = [s for s in states if s not in ROW_STATES]
        if unknown:
            raise EditError(
                f"table optimizer state {[prefix + s for s in unknown]} is not one "
                f"this tool can move with its rows (known: {', '.join(ROW_STATES)})"
            )
        out[layer] = [table_key(layer)] + [prefix + s for s in states]
    return out


def select_layers(
    available: Sequence[int], requested: Sequence[int] | None, source: str
) -> list[int]:
    """The layers to edit: `requested` (None: every STEM layer), each checked to be a STEM layer."""
    if not available:
        raise EditError(
            f"{source} has no STEM tables (a dense model, stem.enabled=false): "
            "knowledge editing swaps STEM table rows, so it needs a STEM checkpoint"
        )
    if requested is None:
        return list(available)
    wrong = sorted(set(requested) - set(available))
    if wrong:
        raise EditError(
            f"layers {wrong} are not STEM layers of {source}; its STEM layers are {list(available)}"
        )
    return sorted(set(requested))
