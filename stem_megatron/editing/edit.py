"""Knowledge edits applied to a checkpoint (written as a new one) or to a loaded model.

    specs = [EditSpec.parse("swap", "Spain=Germany")]
    edit_checkpoint("runs/tiny", "runs/tiny_edited", specs, layers=[1, 3])
    # or, in memory, on a model from load_for_inference:
    edit_model(loaded.model, plan_edits(loaded.tokenizer, specs), layers=None)

Edits apply in the order given; each reads the rows as the previous one left them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from stem_megatron.checkpoint.errors import CheckpointExistsError
from stem_megatron.checkpoint.offline import OfflineCheckpoint, write_checkpoint
from stem_megatron.data.tokenizer import Tokenizer, load_tokenizer
from stem_megatron.editing.entities import EditError, resolve_entity
from stem_megatron.editing.rows import RowPlan, apply_plan, build_plan
from stem_megatron.editing.spec import EditSpec
from stem_megatron.editing.tables import row_keys, select_layers, table_layers
from stem_megatron.repo_paths import from_repo_root

_TABLE_MODULE = re.compile(r"decoder\.layers\.(\d+)\.mlp\.stem_table")


def plan_edits(
    tokenizer: Tokenizer,
    specs: Sequence[EditSpec],
    rule: str = "strict",
    pick: int = -1,
    forms: str = "inner",
) -> list[tuple[EditSpec, RowPlan]]:
    """Resolve every entity and build each edit's row plan (errors before anything is read)."""
    return [
        (
            spec,
            build_plan(
                spec.operation,
                [resolve_entity(tokenizer, e, forms) for e in spec.entities],
                rule,
                pick,
            ),
        )
        for spec in specs
    ]


def _check_rows(plans: Sequence[tuple[EditSpec, RowPlan]], rows: int, source: str) -> None:
    for spec, plan in plans:
        ids = [d for d in plan] + [r for value in plan.values() for r, _ in value]
        if ids and max(ids) >= rows:
            raise EditError(
                f"{spec}: token id {max(ids)} is outside the STEM tables of {source} "
                f"({rows} rows): was the checkpoint trained with another tokenizer?"
            )


def edit_model(
    model: torch.nn.Module,
    plans: Sequence[tuple[EditSpec, RowPlan]],
    layers: Sequence[int] | None = None,
) -> list[int]:
    """Apply the plans to the STEM tables of a single-process model in place; returns the
    layers edited. Only the weights change (a model for inference has no optimizer state)."""
    tables = {
        int(m.group(1)): t
        for name, t in model.stem_tables().items()
        if (m := _TABLE_MODULE.fullmatch(name))
    }
    chosen = select_layers(sorted(tables), layers, "the model")
    _check_rows(plans, tables[chosen[0]].weight.shape[0], "the model")
    for _, plan in plans:
        for layer in chosen:
            apply_plan(plan, [tables[layer].weight.data])
    return chosen


def edit_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    specs: Sequence[EditSpec],
    *,
    layers: Sequence[int] | None = None,
    rule: str = "strict",
    pick: int = -1,
    forms: str = "inner",
    tokenizer_path: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write `output` (a new checkpoints dir: step_<N>/ and latest) holding `source` with the
    edits applied to its STEM tables and their optimizer moments. `source` is never modified;
    `output` must not exist. Returns the new step dir."""
    if Path(output).exists():
        raise CheckpointExistsError(
            f"output {output} already exists: choose a new path "
            "(edits never overwrite a checkpoint)"
        )
    ckpt = OfflineCheckpoint(source)
    chosen = select_layers(table_layers(ckpt.keys()), layers, str(ckpt.path))
    recorded = from_repo_root(ckpt.config_dict["data"]["tokenizer"])  # works from any directory
    tokenizer = load_tokenizer(tokenizer_path or recorded)
    plans = plan_edits(tokenizer, specs, rule, pick, forms)
    groups = row_keys(ckpt.keys(), chosen)
    _check_rows(plans, ckpt.info(groups[chosen[0]][0]).shape[0], str(ckpt.path))
    reading = tqdm(
        ckpt.tensors(),
        total=len(ckpt.keys()),
        desc="read",
        unit="tensor",
        leave=False,
        disable=not sys.stderr.isatty(),
    )  # quiet in logs
    tensors = dict(reading)
    for spec, plan in plans:
        for layer in chosen:
            apply_plan(plan, [tensors[key] for key in groups[layer]])
        log(
            f"{spec}: {len(plan)} token rows in each of layers {chosen} (with their "
            "optimizer moments)"
        )
    metadata = dict(ckpt.metadata)
    metadata["knowledge_edits"] = list(ckpt.metadata.get("knowledge_edits", [])) + [
        {
            "source": str(ckpt.path),
            "edits": [str(spec) for spec, _ in plans],
            "layers": chosen,
            "rule": rule,
            "pick": pick,
            "forms": forms,
        }
    ]
    return write_checkpoint(output, tensors, metadata, ckpt.scalars)
