"""On-disk layout of a run's checkpoints and the file operations that commit them.

    <run>/checkpoints/
        step_100/             one complete checkpoint
            .metadata         DCP metadata (tensor shapes, shard offsets)
            __0_0.distcp ...  DCP tensor shards
            scalars.json      non-tensor leaves of the state, by dotted key
            metadata.json     the caller's metadata (config, data position, ...)
            manifest.json     size and CRC-32 of each file above (manifest.py)
        latest                text file: "step_100"
        .tmp_step_200_ab12/   a save in progress or a crashed one: never loaded

A checkpoint becomes visible only by renaming its finished tmp dir, so a reader sees
either nothing or all of it; `latest` is replaced atomically after that rename.
"""

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from stem_megatron.checkpoint.errors import CheckpointExistsError, CheckpointNotFoundError
from stem_megatron.checkpoint.manifest import Manifest, damaged, verify_file

LATEST = "latest"
DCP_METADATA = ".metadata"
SCALARS_JSON = "scalars.json"
METADATA_JSON = "metadata.json"
TMP_PREFIX = ".tmp_"
# metadata.json key of a checkpoint that holds model weights only (an HF import): it can start
# a run with checkpoint.finetune=true, not resume one.
MODEL_ONLY = "model_only"
REQUIRED_FILES = (DCP_METADATA, SCALARS_JSON, METADATA_JSON)
_STEP_DIR = re.compile(r"step_(\d+)")


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def tmp_dir_name(step: int) -> str:
    return f"{TMP_PREFIX}step_{step}_{secrets.token_hex(4)}"


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created/renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, final: Path) -> None:
    """Publish a finished tmp checkpoint dir as `final`, then point `latest` at it."""
    fsync_dir(tmp)
    if final.exists():  # os.rename onto an empty dir would succeed on POSIX: never overwrite
        raise CheckpointExistsError(f"{final} appeared while saving; refusing to overwrite it")
    os.rename(tmp, final)
    fsync_dir(final.parent)
    point_latest_at(final)


def point_latest_at(step_dir: Path) -> None:
    """Atomically replace `latest` in `step_dir`'s parent with a pointer to it."""
    pointer_tmp = step_dir.parent / f"{TMP_PREFIX}{LATEST}_{secrets.token_hex(4)}"
    write_durable(pointer_tmp, step_dir.name + "\n")
    os.replace(pointer_tmp, step_dir.parent / LATEST)
    fsync_dir(step_dir.parent)


def remove_stale_tmp(checkpoints: Path) -> list[Path]:
    """Delete leftovers of crashed saves; call only when no save is in progress."""
    removed = []
    for entry in checkpoints.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def resolve(path: str | os.PathLike) -> Path:
    """The complete checkpoint directory that `path` designates.

    Accepts a checkpoint dir (`.../step_N`), a checkpoints dir (follows `latest`), its
    `latest` file, or a run dir (follows `<run>/checkpoints/latest`). Raises CheckpointNotFoundError
    saying which of those it failed to find.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"no such checkpoint path: {p}")
    if p.name == LATEST and p.is_file():  # the pointer itself: the checkpoints dir it is in
        p = p.parent
    if not p.is_dir():
        raise CheckpointNotFoundError(f"checkpoint path is not a directory: {p}")
    if p.name.startswith(TMP_PREFIX):
        raise CheckpointNotFoundError(f"{p} is an unfinished (or crashed) save, not a checkpoint")
    if _STEP_DIR.fullmatch(p.name) or any((p / name).exists() for name in REQUIRED_FILES):
        return _require_complete(p)
    if not (p / LATEST).exists() and (p / "checkpoints").is_dir():
        p = p / "checkpoints"  # a run dir
    pointer = p / LATEST
    if not pointer.is_file():
        raise CheckpointNotFoundError(
            f"no '{LATEST}' pointer in {p}: it is not a checkpoints dir with a finished save "
            "(pass a step_N directory to load a specific checkpoint)"
        )
    name = pointer.read_text().strip()
    if not _STEP_DIR.fullmatch(name):
        raise CheckpointNotFoundError(f"{pointer} holds {name!r}, expected 'step_<N>'")
    target = p / name
    if not target.is_dir():
        raise CheckpointNotFoundError(f"{pointer} points to {name}, but {target} does not exist")
    return _require_complete(target)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint here, or None if nothing was ever committed.

    Usually the one `latest` names; but a save that died between renaming its `step_N` into
    place and replacing `latest` leaves a complete `step_N` newer than the pointer (a step
    dir only appears whole, by rename). Resuming from the pointer would then redo step N and
    fail to save it on every restart, so the newest complete step wins."""
    if not checkpoints.is_dir():
        return None
    steps = sorted(
        (
            (int(m.group(1)), entry)
            for entry in checkpoints.iterdir()
            if (m := _STEP_DIR.fullmatch(entry.name)) and entry.is_dir()
        ),
        reverse=True,
    )
    for _, entry in steps:
        if all((entry / name).is_file() for name in REQUIRED_FILES):
            return entry
    return None


def step_of(entry: Path) -> int | None:
    """N for a `step_N` name, else None."""
    m = _STEP_DIR.fullmatch(entry.name)
    return int(m.group(1)) if m else None


def read_json(checkpoint: Path, name: str) -> dict[str, Any]:
    """A JSON object file of a checkpoint (metadata.json, scalars.json), checked against the
    manifest when there is one; a damaged one is a CheckpointCorruptError naming it."""
    path = checkpoint / name
    verify_file(checkpoint, name)
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(path, f"is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise damaged(path, f"holds a JSON {type(value).__name__}, expected an object")
    return value


def _require_complete(p: Path) -> Path:
    absent = [name for name in REQUIRED_FILES if not (p / name).is_file()]
    if absent:
        raise CheckpointNotFoundError(
            f"{p} is not a complete checkpoint: missing {', '.join(absent)}"
        )
    manifest = Manifest.read(p)
    if manifest is not None:
        manifest.check_sizes()
    return p
