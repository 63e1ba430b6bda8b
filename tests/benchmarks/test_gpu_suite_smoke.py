"""`make test-gpu` and benchmarks/bench_gpu.py cannot rot unseen on CPU machines: with CUDA hidden
(CUDA_VISIBLE_DEVICES empty, so this holds on a GPU machine too) every gpu test is collected
(its imports and fixtures resolve) and skips, one line says why, and the benchmark says it
measured nothing and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def gpu_test_files() -> list[str]:
    """tests/gpu and the files with a CUDA case of a CPU test (tests/devices.py's on_cuda):
    the whole tree would take a minute to collect here."""
    files = [p for p in (ROOT / "tests").rglob("test_*.py") if "on_cuda(" in p.read_text()]
    return ["tests/gpu", *(str(p.relative_to(ROOT)) for p in files)]


def test_gpu_tests_are_collected_and_skip_without_cuda():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", *gpu_test_files()],
        cwd=ROOT,
        env=NO_CUDA_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    summary = [line for line in lines if line.startswith("no CUDA device: make test-gpu needs one")]
    assert len(summary) == 1, done.stdout[-3000:]
    skipped = int(summary[0].split(": ")[-1].split()[0])
    assert f"{skipped} skipped" in lines[-1] and "passed" not in lines[-1], lines[-1]
    # Every file of tests/gpu is collected and skipped (none fails to import).
    for path in sorted((ROOT / "tests" / "gpu").glob("test_*.py")):
        assert any(f"tests/gpu/{path.name}:" in line for line in lines), path.name


def test_gpu_benchmark_without_cuda_measures_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--json", str(out)],
        cwd=ROOT,
        env=NO_CUDA_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "no CUDA device: nothing measured\n"
    assert not out.exists()
