"""A checkpoint as one directory holding one safetensors file and a JSON description:

    <out>/checkpoint.safetensors   every tensor of the checkpoint under its flat key
                                   (model.*, optim.*, stem_optim.*, rng.*), full logical shape
    <out>/checkpoint.json          {"format", "step", "data" (stream position), "config"
                                   (resolved run config), "scalars", "model_keys",
                                   "optimizer_keys", "rng_keys", "metadata" (the whole
                                   metadata.json, written back by from_safetensors)}

`to_safetensors` streams: one tensor is in memory at a time. `from_safetensors` writes a DCP
checkpoint that training resumes from (checkpoint.load=<out>) under any layout; its tensors
are views of the mapped safetensors file. Both write to a temporary sibling and rename.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from tqdm import tqdm

from stem_megatron.checkpoint import layout
from stem_megatron.checkpoint.errors import CheckpointExistsError, CheckpointNotFoundError
from stem_megatron.checkpoint.offline import OfflineCheckpoint, publish, write_checkpoint
from stem_megatron.checkpoint.safetensors_io import SafetensorsReader, write_safetensors

FORMAT = "stem_megatron.consolidated.v1"
TENSORS_FILE = "checkpoint.safetensors"
JSON_FILE = "checkpoint.json"


def _keys_of(ckpt: OfflineCheckpoint, kinds: tuple[str, ...]) -> list[str]:
    return [key for key, info in ckpt.infos().items() if info.kind in kinds]


def to_safetensors(
    source: str | os.PathLike, out: str | os.PathLike, progress: bool = True
) -> Path:
    """Consolidate the checkpoint at `source` into a new directory `out`; returns `out`."""
    ckpt = OfflineCheckpoint(source)
    out = Path(out)
    if out.exists():
        raise CheckpointExistsError(f"output {out} already exists; choose a new path")
    infos = ckpt.infos()
    description = {
        "format": FORMAT,
        "step": ckpt.step,
        "data": ckpt.metadata.get("data"),
        "config": ckpt.config_dict,
        "scalars": ckpt.scalars,
        "model_keys": _keys_of(ckpt, ("model",)),
        "optimizer_keys": _keys_of(ckpt, ("dense optimizer", "table optimizer")),
        "rng_keys": _keys_of(ckpt, ("rng",)),
        "metadata": ckpt.metadata,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{layout.TMP_PREFIX}{out.name}_{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        total = sum(info.nbytes for info in infos.values())
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="to-safetensors", disable=not progress
        ) as bar:

            def stream():
                for key, tensor in ckpt.tensors():
                    yield key, tensor
                    bar.update(infos[key].nbytes)

            write_safetensors(
                tmp / TENSORS_FILE,
                [(k, i.shape, i.dtype) for k, i in infos.items()],
                stream(),
                metadata={"format": FORMAT, "step": str(ckpt.step)},
            )
        layout.write_durable(tmp / JSON_FILE, json.dumps(description, indent=1))
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_description(source: Path) -> dict:
    """checkpoint.json of a consolidated directory, checked for what from_safetensors needs."""
    for name in (TENSORS_FILE, JSON_FILE):
        if not (source / name).is_file():
            raise CheckpointNotFoundError(
                f"{source} is not a consolidated checkpoint: missing {name} "
                f"(make one with `convert_checkpoint.py to-safetensors`)"
            )
    description = json.loads((source / JSON_FILE).read_text())
    absent = [k for k in ("format", "metadata", "config", "scalars") if k not in description]
    if absent or description["format"] != FORMAT:
        raise ValueError(
            f"{source / JSON_FILE} is not a {FORMAT} description "
            f"(format {description.get('format')!r}, missing {absent})"
        )
    return description


def from_safetensors(
    source: str | os.PathLike, out: str | os.PathLike, progress: bool = True
) -> Path:
    """Write the consolidated directory `source` as a new checkpoints dir `out` (step_<N> and
    `latest`); returns the step dir."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise CheckpointNotFoundError(f"no such consolidated checkpoint directory: {source}")
    description = read_description(source)
    if out.exists():
        raise CheckpointExistsError(f"output {out} already exists; choose a new path")
    with SafetensorsReader(source / TENSORS_FILE) as reader:
        names = list(reader.entries)
        listed = set(
            description.get("model_keys", [])
            + description.get("optimizer_keys", [])
            + description.get("rng_keys", [])
        )
        if listed and listed != set(names):
            raise ValueError(
                f"{source}: {JSON_FILE} lists other tensors than {TENSORS_FILE} "
                f"holds (e.g. {sorted(listed ^ set(names))[:3]})"
            )
        tensors = {name: reader.get(name) for name in names}  # views: nothing read yet
        if progress:  # DCP writes them in one call, so there is no per-tensor progress to show
            print(
                f"writing {len(names)} tensors "
                f"({sum(t.nbytes for t in tensors.values()) / 2**20:.1f} MiB) to {out}"
            )
        # The JSON's config wins: it is the one a user may have edited (e.g. the layout).
        metadata = {**description["metadata"], "config": description["config"]}
        try:
            return write_checkpoint(out, tensors, metadata, description["scalars"])
        finally:
            del tensors  # views of the map: released before the reader closes it
