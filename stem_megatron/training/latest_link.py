"""`<runs dir>/latest`: a symlink to the run started last in that directory, so commands can
name "the run I just made" (`runs/latest`) although `make train` gives each run a new
timestamped directory. Only a symlink is ever replaced: a real file or directory called
`latest` belongs to the user and is left as it is."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

LINK_NAME = "latest"


def point_latest_at(run_dir: str | Path) -> str | None:
    """Make `<run_dir's parent>/latest` a relative symlink to `run_dir` (atomically: a new
    link renamed over the old one). Returns a one-line note when the link could not be set
    (the run goes on either way), else None."""
    run_dir = Path(os.path.abspath(run_dir))
    link = run_dir.parent / LINK_NAME
    if run_dir == link or (link.exists() and link.resolve() == run_dir.resolve()):
        return None  # the run was given as runs/latest, or the link already names it
    if link.exists() and not link.is_symlink():
        return f"note: {link} is not a symlink, so it was left as it is and does not name this run"
    tmp = link.with_name(f".{LINK_NAME}.{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, link)
    except OSError as exc:  # a file system without symlinks, or a read-only runs dir
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return f"note: could not point {link} at this run ({exc.strerror or exc})"
    return None
