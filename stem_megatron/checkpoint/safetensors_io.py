"""The safetensors file layout, written and read one tensor at a time.

A .safetensors file is an 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}} and the
tensors' raw little-endian bytes back to back. The header needs only shapes and dtypes, so
it is written first and each tensor's bytes follow as it is read: a checkpoint never has to
be in memory at once (safetensors' own save_file needs every tensor up front). Reading maps
the file copy-on-write, so tensors are views of the page cache and the file is never written.
"""

from __future__ import annotations

import json
import mmap
import struct
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}
_ALIGN = 8  # header padded with spaces so tensor data starts 8-byte aligned


class SafetensorsFormatError(ValueError):
    """A file is not a well-formed safetensors file."""


def _check_byte_order() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this machine is big-endian")


def write_safetensors(
    path: Path,
    specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` (yielded one at a time, in the order of `specs`) to `path`.

    `specs` lists (name, shape, dtype) of every tensor in advance, for the header; each
    yielded tensor must match its spec."""
    _check_byte_order()
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors name")
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        header[name] = {
            "dtype": DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for (name, shape, dtype), (got, tensor) in zip(specs, tensors, strict=True):
            if got != name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"tensor {got!r} {tuple(tensor.shape)} {tensor.dtype} does not "
                    f"match the header entry {name!r} {tuple(shape)} {dtype}"
                )
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        f.flush()


class SafetensorsReader:
    """Names, shapes and zero-copy tensors of a .safetensors file (use as a context manager)."""

    def __init__(self, path: Path) -> None:
        _check_byte_order()
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsFormatError(f"{path} is too short to be a safetensors file")
            (length,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(length))
            except (ValueError, UnicodeDecodeError) as e:
                raise SafetensorsFormatError(f"{path}: unreadable safetensors header ({e})") from e
            f.seek(0, 2)
            self._data_size = f.tell() - 8 - length
        if not isinstance(header, dict):
            raise SafetensorsFormatError(f"{path}: the safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self._start = 8 + length
        self._file = open(self.path, "rb")
        # ACCESS_COPY: writable views for torch.frombuffer that never reach the file.
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.entries[name]["dtype"]
        if code not in _TORCH_DTYPES:
            raise SafetensorsFormatError(f"{self.path}: {name!r} has unsupported dtype {code}")
        return _TORCH_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, a view of the mapped file (no copy)."""
        if name not in self.entries:
            raise KeyError(f"{self.path} holds no tensor {name!r}")
        begin, end = self.entries[name]["data_offsets"]
        dtype, shape = self.dtype(name), self.shape(name)
        count = 1
        for dim in shape:
            count *= dim
        if end - begin != count * dtype.itemsize or not 0 <= begin <= end <= self._data_size:
            raise SafetensorsFormatError(f"{self.path}: {name!r} has inconsistent data offsets")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(
            self._map, dtype=torch.uint8, count=end - begin, offset=self._start + begin
        )
        return flat.view(dtype).reshape(shape)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # tensors still view it: the map goes when the last of them does
            pass
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
