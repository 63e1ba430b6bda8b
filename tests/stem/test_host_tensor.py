"""Host tables' memory (stem/storage.py host_tensor): the exact bytes asked for, pinned by
registering them with CUDA when a GPU copies from them (not through torch's pinned allocator,
which rounds each request up to a power of two and caches the block)."""

from __future__ import annotations

import gc

import pytest
import torch

from stem_megatron.stem.storage import host_tensor, pin_host_memory, to_host

SHAPES = [((1000, 352), torch.float32), ((3, 5), torch.bfloat16), ((0, 8), torch.float32)]


@pytest.mark.parametrize(("shape", "dtype"), SHAPES)
def test_host_tensor_holds_exactly_the_bytes_of_its_shape(shape, dtype) -> None:
    t = host_tensor(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu"
    assert t.is_contiguous()
    nbytes = t.numel() * t.element_size()
    assert t.untyped_storage().nbytes() == max(nbytes, 1)
    assert t.is_pinned() == (pin_host_memory() and nbytes > 0)


def test_to_host_copies_values_and_they_outlive_the_source() -> None:
    src = torch.randn(64, 48)
    host = to_host(src)
    expected = src.clone()
    del src
    gc.collect()
    assert torch.equal(host, expected)
    view = host[10:20]
    del host
    gc.collect()  # the memory stays while a view of it lives
    assert torch.equal(view, expected[10:20])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_pinned_host_tensor_is_exact_and_copies_asynchronously() -> None:
    rows, width = 1000, 88_000  # 352 MB: torch's pinned allocator would take 512 MiB
    pooled = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    t = host_tensor((rows, width), torch.float32)
    assert t.is_pinned() and t.untyped_storage().nbytes() == rows * width * 4
    # Not from torch's caching pinned allocator, whose blocks are rounded and kept.
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == pooled
    t[:2].fill_(3.0)
    device = torch.empty(2, width, device="cuda")
    device.copy_(t[:2], non_blocking=True)
    torch.cuda.synchronize()
    assert bool((device == 3.0).all())
