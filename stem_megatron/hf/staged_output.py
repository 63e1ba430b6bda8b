"""Write a tool's output directory so that it appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_output_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; when the block succeeds it is renamed
    to `out`, when it fails it is removed. An existing `out` is refused before any work."""
    if out.exists() or out.is_symlink():
        raise FileExistsError(
            f"output path {out} already exists; choose a new path (nothing was written or changed)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():  # appeared while we worked: never replace someone else's output
            raise FileExistsError(
                f"output path {out} appeared while writing; refusing to replace it"
            )
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
