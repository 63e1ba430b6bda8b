"""Whether a checkpoint fits where it is going: its size from the state, and the disk's free
space."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from stem_megatron.writable import nearest_existing

# DCP stores each tensor as its own small zip record (headers, alignment); a few KiB per
# tensor covers it, plus the JSON files and .metadata.
_PER_TENSOR_OVERHEAD = 4096
_FIXED_OVERHEAD = 1 << 20


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the whole logical tensor a checkpoint stores for this (possibly sharded) leaf."""
    if hasattr(tensor, "metadata") and hasattr(tensor, "local_shards"):  # ShardedTensor
        metadata = tensor.metadata()  # it answers no tensor methods (element_size) itself
        numel = 1
        for size in metadata.size:
            numel *= size
        return numel * metadata.tensor_properties.dtype.itemsize
    return tensor.numel() * tensor.element_size()  # a DTensor's numel is its global one


def checkpoint_nbytes(nbytes_by_key: dict[str, int], json_bytes: int = 0) -> int:
    """Estimated size on disk of a checkpoint of these tensors (every key once: DCP writes
    a tensor replicated over ranks once)."""
    return (
        sum(nbytes_by_key.values())
        + _PER_TENSOR_OVERHEAD * len(nbytes_by_key)
        + _FIXED_OVERHEAD
        + json_bytes
    )


def human(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def free_bytes(directory: Path) -> int:
    """Free space for an unprivileged writer on the disk holding `directory` (or its
    nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(directory)).free


def space_problem(directory: Path, need: int) -> str | None:
    """Why a checkpoint of `need` bytes would not fit in `directory`; None if it fits."""
    free = free_bytes(directory)
    if free >= need:
        return None
    return f"{directory} has {human(free)} free, a checkpoint of this run needs about {human(need)}"
