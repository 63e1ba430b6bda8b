"""Building the C++ row kernel (stem/csrc/row_kernel.py) on a node: a build killed midway
does not hang the next one, concurrent builders wait on one lock, and a node without a
compiler warns once and uses the fallback."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stem_megatron.stem.csrc import row_kernel
from stem_megatron.stem.sparse_adam import SparseRowAdamW

BUILD = (
    "from stem_megatron.stem.csrc import row_kernel\n"
    "print(row_kernel.build_directory(), flush=True)\n"
    "row_kernel.load()\n"
    "print('built', flush=True)\n"
)


def _build(env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BUILD],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its ninja and compiler die with it
        **kw,
    )


def test_a_killed_build_leaves_nothing_that_blocks_the_next(tmp_path: Path) -> None:
    """A builder whose compiler stalls is SIGKILLed mid-build, leaving torch's own lock file
    (its 'baton', on which torch's load() would wait forever); the next build completes."""
    slow = tmp_path / "slow-c++"
    slow.write_text('#!/usr/bin/env bash\nsleep 600\nexec c++ "$@"\n')
    slow.chmod(0o755)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    first = _build({**env, "CXX": str(slow)})
    directory = Path(first.stdout.readline().strip())
    deadline = time.monotonic() + 120
    while not (directory / "lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (directory / "lock").exists(), "the first build never started"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = _build(env)
    try:
        out, _ = second.communicate(timeout=90)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    assert out.splitlines()[-1] == "built"


def test_builders_wait_on_the_lock_holder(tmp_path: Path) -> None:
    """While one process holds the build lock another waits, and gives up after its timeout."""
    directory = tmp_path / "build"
    with row_kernel.build_lock(directory):
        waiter = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path\n"
                "from stem_megatron.stem.csrc import row_kernel\n"
                "with row_kernel.build_lock(Path(sys.argv[1]), timeout_s=0.5): pass\n",
                str(directory),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert waiter.returncode != 0
    assert "held the row kernel's build lock" in waiter.stderr
    with row_kernel.build_lock(directory, timeout_s=0.5):  # free again
        pass


def test_no_compiler_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", "no-such-c++")
    row_kernel.load.cache_clear()
    row_kernel.build_problem.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=row_kernel.__name__):
            for _ in range(3):
                table = torch.nn.Parameter(torch.zeros(4, 3))
                assert SparseRowAdamW({"u": table}).kernel == "torch"
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1
        assert "no C++ compiler 'no-such-c++'" in warnings[0].getMessage()
        assert "5-10x slower" in warnings[0].getMessage()
    finally:
        row_kernel.load.cache_clear()
        row_kernel.build_problem.cache_clear()
