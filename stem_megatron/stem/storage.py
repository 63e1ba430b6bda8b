"""Where STEM tables are stored, and the engine that copies their rows to the compute device.

`device` tier: the table is an ordinary tensor on the compute device. `host` tier: the table
and its optimizer state live in host memory and the rows each micro-batch needs are staged
ahead of use (stem/prefetch.py). `mmap` tier: as `host`, but the table and its optimizer state
are memory-mapped files on a local disk (`MmapFiles`), so they may exceed host RAM: the kernel
pages rows in when the prefetch gathers them and writes updated rows back. This file is the one
place that looks at the machine's capabilities: host memory is pinned when CUDA is present (so
copies can be asynchronous), and the copies then run on their own CUDA stream with events
ordering them against the compute stream; on a CPU machine the same logic runs and a copy is a
memcpy.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch


def pin_host_memory() -> bool:
    """Pinned (page-locked) host memory is only worth its cost when a GPU copies from it."""
    return torch.cuda.is_available()


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor, pinned when that allows asynchronous copies.

    Pinned exactly: torch's pinned allocator (`pin_memory=True`) rounds every request up to a
    power of two and keeps the block cached, so a 352 MB table slice would hold 512 MiB for
    good while the fit check counts 352. Here the bytes are allocated plainly and registered
    with CUDA (cudaHostRegister), and unregistered when the last tensor on them is gone."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    memory = np.empty(max(nbytes, 1), dtype=np.uint8)
    tensor = torch.from_numpy(memory)[:nbytes].view(dtype).view(shape)
    if pin_host_memory() and nbytes:
        cudart = torch.cuda.cudart()
        address = memory.ctypes.data
        error = cudart.cudaHostRegister(address, nbytes, 0)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes:,} bytes failed (CUDA error {error})")
        # The array lives as long as any tensor on its memory (torch.from_numpy keeps it).
        weakref.finalize(memory, cudart.cudaHostUnregister, address)
    return tensor


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` in host memory (pinned when that allows asynchronous copies)."""
    return host_tensor(tuple(tensor.shape), tensor.dtype).copy_(tensor)


def host_empty(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    return host_tensor((rows, width), dtype)


def available_host_bytes() -> int:
    """Host RAM that can be allocated now without swapping (psutil when installed, else the
    kernel's count of available physical pages)."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def host_table_bytes(rows: int, width: int, dtype: torch.dtype, exact: bool) -> int:
    """Host bytes of one table and its optimizer state: the rows, fp32 exp_avg and
    exp_avg_sq, and in exact mode the per-row settled step (int64)."""
    element = torch.empty((), dtype=dtype).element_size()
    return rows * width * (element + 8) + (rows * 8 if exact else 0)


def check_host_fits(needed: int, what: str, available: int | None = None) -> None:
    """Refuse before allocating: a table that does not fit would be killed by the OOM killer
    (or swap) mid-run, long after the config was read."""
    available = available_host_bytes() if available is None else available
    if needed > available:
        raise MemoryError(
            f"{what} needs {needed:,} bytes of host memory but only {available:,} bytes are "
            f"available; use fewer or narrower tables, more tensor/pipeline parallelism, or "
            f"stem.storage=device"
        )


class MmapFiles:
    """Zero-initialised CPU tensors backed by files in `directory` (the `mmap` tier).

    Each file is unlinked as soon as it is mapped: the mapping keeps the pages (written back
    to the disk, not to swap), nothing is left behind when the process ends, a crash
    included, and runs sharing the directory cannot collide. Checkpoints, not these files,
    are what persists."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as exc:
            raise PermissionError(
                f"stem.mmap_dir {self.directory} is not writable ({exc.strerror}): set "
                f"stem.mmap_dir to a writable directory on a local disk"
            ) from None

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.directory).free

    def check_fits(self, needed: int, what: str) -> None:
        free = self.free_bytes()
        if needed > free:
            raise MemoryError(
                f"{what} needs {needed:,} bytes on disk in {self.directory} but only {free:,} "
                f"bytes are free; set stem.mmap_dir to a larger local disk, or use fewer or "
                f"narrower tables"
            )

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(dir=self.directory, prefix="stem-table-", suffix=".bin")
        try:
            os.ftruncate(fd, nbytes)  # a sparse file: reads as zeros, no bytes written yet
            tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        finally:
            os.close(fd)
            os.unlink(path)
        return tensor.view(shape)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.zeros(tuple(tensor.shape), tensor.dtype).copy_(tensor)


def synchronize(device: torch.device) -> None:
    """Wait for the compute device (to time work that may run asynchronously on it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CopyEngine:
    """Host-to-device row copies off the compute stream. With CUDA: a side stream, and events
    that make the compute stream wait for a copy and a later copy wait for the compute that
    read its buffer. Without: copies run inline in the calling thread and markers are None."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def context(self):
        return (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )

    def copy_marker(self):
        """Marks the copies issued so far on the copy stream."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def compute_marker(self):
        """Marks the compute issued so far (e.g. the last read of a staging buffer)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def compute_waits(self, marker, *tensors: torch.Tensor) -> None:
        """The compute stream waits for a copy; `tensors` allocated on the copy stream are
        marked as used by the compute stream, so their memory is not reused too early."""
        if marker is None:
            return
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(marker)
        for tensor in tensors:
            tensor.record_stream(stream)

    def host_waits(self, marker) -> None:
        """Block the calling thread until a copy has read its host buffer (before refilling it)."""
        if marker is not None:
            marker.synchronize()

    def copy_waits(self, marker) -> None:
        if marker is not None:
            self.stream.wait_event(marker)
