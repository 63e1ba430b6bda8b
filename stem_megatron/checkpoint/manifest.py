"""Per-file sizes and CRC-32s of a checkpoint, recorded at save and checked at load.

`manifest.json` sits next to `metadata.json` in each `step_N/`:

    {"format": 1, "checksum": "crc32",
     "files": {"__0_0.distcp": {"bytes": 9735388, "crc32": "1a2b3c4d"}, ...}}

It lists every other file of the checkpoint. Sizes are checked whenever a checkpoint is
resolved (a stat per file); a file's CRC-32 when its bytes are first read, so a tool that
reads one tensor checksums only the shard file holding it. CRC-32 (zlib; its rate is
in benchmarks/RESULTS.md) detects copy truncation and overwritten blocks; it is not a defence
against a crafted file (the allow-listed unpickler and weights_only loads are). Checkpoints
saved before the manifest existed load without these checks.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

from stem_megatron.checkpoint.errors import CheckpointCorruptError

MANIFEST_JSON = "manifest.json"
_CHUNK = 8 << 20


def digest_file(path: Path) -> dict[str, Any]:
    """{"bytes": size, "crc32": hex} of one file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def manifest_text(digests: dict[str, dict[str, Any]]) -> str:
    return json.dumps(
        {"format": 1, "checksum": "crc32", "files": dict(sorted(digests.items()))}, indent=1
    )


def damaged(path: Path, problem: str) -> CheckpointCorruptError:
    """The error for a damaged file of the checkpoint dir `path.parent`, with the fix."""
    return CheckpointCorruptError(
        f"checkpoint {path.parent} is damaged: {path.name} {problem}; copy the checkpoint again "
        f"from its source, or load an earlier step_N"
    )


class Manifest:
    """The recorded files of one checkpoint dir; `verify` checksums each file at most once."""

    def __init__(self, directory: Path, files: dict[str, dict[str, Any]]) -> None:
        self.directory, self.files = directory, files
        self._verified: set[str] = set()

    @classmethod
    def read(cls, directory: str | Path) -> Manifest | None:
        """The manifest of `directory`, or None for a checkpoint saved without one."""
        directory = Path(directory)
        path = directory / MANIFEST_JSON
        if not path.is_file():
            return None
        try:
            files = json.loads(path.read_text())["files"]
            if not all(
                isinstance(e["bytes"], int) and isinstance(e["crc32"], str) for e in files.values()
            ):
                raise ValueError("an entry lacks bytes or crc32")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise damaged(path, f"is unreadable ({e})") from e
        return cls(directory, files)

    def check_sizes(self) -> None:
        """Every recorded file is present with its recorded size (no data read)."""
        for name, entry in self.files.items():
            path = self.directory / name
            if not path.is_file():
                raise damaged(path, "is missing")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise damaged(
                    path,
                    f"has {size:,} bytes, {entry['bytes']:,} were saved "
                    f"(truncated or partly copied)",
                )

    def verify(self, name: str) -> None:
        """The file `name` has its recorded size and CRC-32; a file the manifest does not
        list is refused (a save writes none)."""
        if name in self._verified:
            return
        path = self.directory / name
        if name not in self.files:
            raise damaged(path, f"is not listed in {MANIFEST_JSON}")
        digest = digest_file(path)
        want = self.files[name]
        if digest["bytes"] != want["bytes"]:
            raise damaged(
                path,
                f"has {digest['bytes']:,} bytes, {want['bytes']:,} were saved "
                f"(truncated or partly copied)",
            )
        if digest["crc32"] != want["crc32"]:
            raise damaged(
                path,
                f"does not match its checksum (CRC-32 {digest['crc32']}, "
                f"{want['crc32']} was saved): its bytes changed after the save",
            )
        self._verified.add(name)


def verify_file(directory: Path, name: str) -> None:
    """Check one file of a checkpoint dir against its manifest, if it has one."""
    manifest = Manifest.read(directory)
    if manifest is not None:
        manifest.verify(name)
