"""Single-process access to a whole checkpoint, without building a model or a process group.

Every tensor of a checkpoint is stored as its full logical tensor (model_state.py), so one
process can list, read and rewrite a checkpoint written under any TP/PP/DP layout:

    ckpt = OfflineCheckpoint("runs/tiny")          # a run dir, checkpoints dir or step dir
    ckpt.step, ckpt.metadata["config"]             # from metadata.json
    for key, info in ckpt.infos().items():         # from DCP's .metadata, no tensor read
        print(key, info.shape, info.dtype)
    table = ckpt.read("model.decoder.layers.1.mlp.stem_table.weight")   # one full tensor
    for key, tensor in ckpt.tensors():             # all of them, one at a time
        ...

    edited = {key: t for key, t in ckpt.tensors()}
    write_checkpoint("runs/edited/checkpoints", edited, ckpt.metadata, ckpt.scalars)

`write_checkpoint` creates a new checkpoints dir holding `step_<N>/` and `latest`, built in a
temporary sibling and renamed into place when complete; training loads it with
`checkpoint.load=<dir>` under any layout, and `load_for_inference(<dir>)` reads it. Keys are
the flat dotted keys of the checkpoint: `model.<param>`, `optim.<param>.{step,exp_avg,
exp_avg_sq}` (dense AdamW), `stem_optim.tables.<table module>.{exp_avg,exp_avg_sq}` (tables'
row-sparse AdamW; every row settled at the saved step), `rng.torch_rank<r>`; the JSON
scalars (`stem_optim.step`) are in `scalars`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import secrets
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from stem_megatron.checkpoint import layout
from stem_megatron.checkpoint.dcp import Checkpointer, calling_dcp
from stem_megatron.checkpoint.errors import CheckpointExistsError, UnsafeCheckpointError
from stem_megatron.checkpoint.flatten import Scalar
from stem_megatron.checkpoint.manifest import Manifest
from stem_megatron.checkpoint.safe_io import (
    SafeFileSystemReader,
    TensorOnlyLoadPlanner,
    read_dcp_metadata,
)

# What each top-level key prefix holds.
KINDS = {
    "model": "model",
    "optim": "dense optimizer",
    "stem_optim": "table optimizer",
    "rng": "rng",
}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def kind(self) -> str:
        """model, dense optimizer, table optimizer or rng (from the key's first part)."""
        return KINDS.get(self.key.split(".", 1)[0], "other")


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    with warnings.catch_warnings():  # "assumes a single process": that is the intent here
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        yield


def _load_in_this_process(state: dict, **kwargs) -> None:
    """dcp.load without collectives, even inside a process group (a reshard worker)."""
    if "no_dist" in inspect.signature(dcp.load).parameters:
        dcp.load(state, no_dist=True, **kwargs)
    else:  # torch < 2.7: only the older entry point takes no_dist
        dcp.load_state_dict(state, no_dist=True, **kwargs)


class OfflineCheckpoint:
    """A complete checkpoint opened for reading by one process (read-only: never modified).

    `path` is anything `layout.resolve` accepts (step dir, checkpoints dir, run dir); raises
    CheckpointNotFoundError for a missing or partial checkpoint."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = layout.resolve(path)
        self.metadata: dict[str, Any] = layout.read_json(self.path, layout.METADATA_JSON)
        self.scalars: dict[str, Scalar] = layout.read_json(self.path, layout.SCALARS_JSON)
        self._manifest = Manifest.read(self.path)  # each shard file checksummed once
        stored = read_dcp_metadata(self.path).state_dict_metadata
        self._infos: dict[str, TensorInfo] = {}
        for key, entry in stored.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise UnsafeCheckpointError(f"{self.path} stores {key!r} as pickled bytes")
            self._infos[key] = TensorInfo(key, tuple(entry.size), entry.properties.dtype)

    @property
    def step(self) -> int:
        return int(self.metadata["step"])

    @property
    def config_dict(self) -> dict[str, Any]:
        """The resolved run config the checkpoint was saved with (as a plain dict)."""
        return self.metadata["config"]

    def keys(self) -> list[str]:
        return list(self._infos)

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def info(self, key: str) -> TensorInfo:
        if key not in self._infos:
            raise KeyError(f"{self.path} holds no tensor {key!r}")
        return self._infos[key]

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def read(self, key: str) -> torch.Tensor:
        """The full logical tensor `key` (CPU), assembled from every rank's shard."""
        info = self.info(key)
        out = {key: torch.empty(info.shape, dtype=info.dtype)}
        with calling_dcp():  # a damaged shard: its CheckpointCorruptError, not DCP's wrapper
            _load_in_this_process(
                out,
                storage_reader=SafeFileSystemReader(self.path, self._manifest),
                planner=TensorOnlyLoadPlanner(),
            )
        return out[key]

    def tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, full tensor) for `keys` (default: all), one tensor in memory at a time."""
        for key in self.keys() if keys is None else keys:
            yield key, self.read(key)


def write_checkpoint(
    out: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, Any],
    scalars: Mapping[str, Scalar] | None = None,
) -> Path:
    """Write a new checkpoints dir `out` holding `step_<metadata["step"]>/` and `latest`.

    `tensors` are full logical tensors by flat key, `metadata` the metadata.json content
    (step, data position, config), `scalars` the JSON scalars (e.g. {"stem_optim.step": N}).
    Built in a temporary sibling of `out` and renamed into place when complete: a failure
    leaves nothing at `out`. Raises CheckpointExistsError if `out` exists. Returns the step
    dir. Call it from one process (with torch.distributed uninitialised or a world of one).
    """
    out = Path(out)
    if out.exists():
        raise CheckpointExistsError(f"output {out} already exists; choose a new path")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            "write_checkpoint runs on one process; torch.distributed has "
            f"{dist.get_world_size()} ranks"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{layout.TMP_PREFIX}{out.name}_{secrets.token_hex(4)}"
    state: dict[str, Any] = {**dict(tensors), **dict(scalars or {})}
    try:
        with _quiet_dcp():
            step_dir = Checkpointer(tmp).save(int(metadata["step"]), state, metadata)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / step_dir.name


def publish(tmp: Path, out: Path) -> None:
    """Rename a finished temporary output into place, never over an existing path."""
    layout.fsync_dir(tmp)
    if out.exists():
        raise CheckpointExistsError(f"{out} appeared while writing; refusing to overwrite it")
    os.rename(tmp, out)
    layout.fsync_dir(out.parent)
