"""Whether a run can create and write a directory, asked before any heavy work starts (a
run that would die on its first write should not build a model first)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a new directory would be made)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why a directory cannot be created or written at `path`; None if it can. Leaves
    nothing behind: it probes by creating and removing an empty directory."""
    existing = nearest_existing(Path(path))
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:  # permission bits do not tell: root passes them, yet /proc or a read-only mount refuse
        os.rmdir(tempfile.mkdtemp(prefix=".write_probe_", dir=existing))
    except OSError as exc:
        return f"cannot create a directory in {existing} ({exc.strerror or exc})"
    return None
