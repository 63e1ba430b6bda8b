"""Step dirs newer than `latest`: what a save interrupted between its two renames leaves.

A save renames its finished `step_N` into place, then replaces `latest`. A crash (node
failure, SIGKILL at the time limit) between the two leaves a complete `step_N` that `latest`
does not name. Resuming from `latest` would redo step N and then find `step_N` taken, on
every requeue. So before a resume each such stray is either adopted (complete, every file
matching its manifest, its metadata.json recording step N: `latest` is pointed at it) or,
if it cannot be trusted, renamed aside to `stray-step_N-<hex>` (never deleted), newest
first. Each action is returned as one line for the run to print.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from stem_megatron.checkpoint import layout
from stem_megatron.checkpoint.errors import CheckpointNotFoundError
from stem_megatron.checkpoint.manifest import Manifest


def _pointer_step(checkpoints: Path) -> int | None:
    """The step `latest` names; -1 without a pointer; None if the pointer is unreadable
    (left for resolve to report)."""
    pointer = checkpoints / layout.LATEST
    if not pointer.exists():
        return -1
    try:
        return layout.step_of(Path(pointer.read_text().strip()))
    except (OSError, UnicodeDecodeError):
        return None


def _untrusted_because(entry: Path, step: int) -> str | None:
    """Why a stray step dir cannot be resumed from; None if it can."""
    try:
        layout.resolve(entry)
        manifest = Manifest.read(entry)
        if manifest is None:
            return "it has no manifest.json to verify it by"
        for name in manifest.files:
            manifest.verify(name)
        saved_step = layout.read_json(entry, layout.METADATA_JSON).get("step")
    except CheckpointNotFoundError as e:  # incomplete or damaged (CheckpointCorruptError)
        return str(e)
    if saved_step != step:
        return f"its metadata.json records step {saved_step!r}"
    return None


def recover_strays(checkpoints: Path) -> list[str]:
    """Adopt or set aside each step dir newer than `latest` (see the module doc); one line
    per action. Call only when no save is in progress."""
    current = _pointer_step(checkpoints) if checkpoints.is_dir() else None
    if current is None:
        return []
    strays = sorted(
        (
            (step, entry)
            for entry in checkpoints.iterdir()
            if (step := layout.step_of(entry)) is not None and step > current and entry.is_dir()
        ),
        reverse=True,
    )
    was = f"step_{current}" if current >= 0 else "none"
    lines = []
    for step, entry in strays:
        problem = _untrusted_because(entry, step)
        if problem is None:
            layout.point_latest_at(entry)
            lines.append(
                f"adopted {entry}: a complete, verified checkpoint newer than "
                f"'latest' ({was}), left by a save interrupted before it moved "
                f"'latest'; resuming from it"
            )
            break
        aside = entry.with_name(f"stray-{entry.name}-{secrets.token_hex(3)}")
        os.rename(entry, aside)
        lines.append(
            f"moved {entry.name} aside to {aside}: it is newer than 'latest' ({was}) "
            f"but cannot be resumed from ({problem})"
        )
    return lines
