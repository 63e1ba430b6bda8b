"""A CPU test's CUDA case: the same test and assertions on the GPU, marked `gpu` so that
`make test-gpu` runs it and `make test` does not (pytest.ini; tests/conftest.py skips it
without CUDA)."""

from __future__ import annotations

import pytest


def on_cuda(*values: object):
    """One parametrize case whose last value is the device "cuda"."""
    return pytest.param(
        *values, "cuda", marks=pytest.mark.gpu, id="-".join(map(str, values + ("cuda",)))
    )
