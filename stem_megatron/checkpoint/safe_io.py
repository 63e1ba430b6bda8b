"""DCP reading without unrestricted pickle.

torch 2.13's DCP has two pickle paths on load (torch/distributed/checkpoint/):
- filesystem.py FileSystemReader.read_metadata: `metadata = pickle.load(metadata_file)`
  on the `.metadata` file, with no restriction at all;
- default_planner.py DefaultLoadPlanner.load_bytes: `torch.load(value, weights_only=False)`
  for every non-tensor (BYTE_IO) item.
Tensor items are safe: FileSystemReader.read_data uses `torch.load(..., weights_only=True)`.

We close both: `.metadata` is unpickled with an allow-list of DCP's own metadata
classes, and the load planner refuses byte items outright (our saves never write
them: non-tensor values live in JSON, see flatten.py).
"""

import collections
import dataclasses
import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from stem_megatron.checkpoint.errors import UnsafeCheckpointError
from stem_megatron.checkpoint.manifest import Manifest, damaged, verify_file

# Everything DCP's `.metadata` pickle references for plain tensors, DTensors and
# ShardedTensors: its metadata dataclasses/enums, torch.Size, dtypes, layouts, paths.
# Globals resolve from this table only, never by importing what the file names.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    },
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    # Rebuilds a layout from its name; torch's weights_only unpickler allows it too.
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "WindowsPath"): pathlib.WindowsPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # vars(), not getattr(): torch resolves some attributes lazily by importing modules.
    **{("torch", name): v for name, v in vars(torch).items() if isinstance(v, torch.dtype)},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise UnsafeCheckpointError(
            f"checkpoint .metadata references {module}.{name}, which is not part of DCP "
            "metadata; refusing to unpickle it"
        )


def read_dcp_metadata(path: str | Path) -> Metadata:
    """Read a DCP `.metadata` file with the allow-listed unpickler, after checking it against
    the checkpoint's manifest. A file that is not a pickle of DCP metadata is damaged
    (CheckpointCorruptError); one that names a global outside the allow-list is unsafe."""
    file = Path(path) / ".metadata"
    verify_file(Path(path), file.name)
    with open(file, "rb") as f:
        try:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:
            raise damaged(file, f"is not readable DCP metadata ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, Metadata):
        raise damaged(file, f"holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` goes through the allow-listed unpickler and whose
    shard files are checked against the manifest before their first read; a shard that still
    fails to parse (a checkpoint without a manifest) is a CheckpointCorruptError naming it.
    Pass one `manifest` to share its record of already-verified files across readers."""

    def __init__(self, path: str | Path, manifest: Manifest | None = None) -> None:
        super().__init__(path)
        self.manifest = manifest if manifest is not None else Manifest.read(path)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(
                item
            )
        for name, items in per_file.items():
            if self.manifest is not None:
                self.manifest.verify(name)
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except UnsafeCheckpointError:
                raise
            except (EOFError, pickle.UnpicklingError, RuntimeError, ValueError) as e:
                raise damaged(
                    Path(self.path) / name, f"is not readable tensor data ({type(e).__name__}: {e})"
                ) from e
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Only the single global `.metadata` of a collective save is supported (what we write).
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """Load planner that never unpickles a non-tensor item."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise UnsafeCheckpointError(
            f"checkpoint stores {read_item.dest_index.fqn!r} as pickled bytes; "
            "stem_megatron checkpoints keep non-tensor values in JSON and never unpickle them"
        )
