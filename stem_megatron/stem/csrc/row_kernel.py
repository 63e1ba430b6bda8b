"""Which row update SparseRowAdamW runs, and the compiled one (row_adamw.cpp beside this file).

Paths:
- `cpp`: the C++ kernel. Updates the touched rows of param, exp_avg and exp_avg_sq in place
  (each read once, written once, no gathered copies), OpenMP over rows. In exact mode it
  settles a row's owed idle steps in the same pass, in closed form (see the source).
  JIT-built on first use with `torch.utils.cpp_extension.load` (quick: the source uses no
  torch headers) and cached under TORCH_EXTENSIONS_DIR; called through ctypes.
- `torch`: torch ops on gathered rows, op for op torch.optim.AdamW's single-tensor path;
  exact mode replays the owed idle steps one by one.
- `torch_fused`: as `torch`, with the row step in AdamW(fused=True)'s kernel.

`auto` (the default) picks `torch_fused` for tables on the GPU, `cpp` for fp32 CPU tables
when the kernel builds, else `torch`
(a node without a C++ compiler warns once: the torch path is 5-10x slower per table step,
benchmarks/bench_table_update.py). The ranks of a node share the build directory: one builds,
the others wait on a file lock, then load what it built (`build_lock`).
The environment variable STEM_ROW_KERNEL (`cpp`, `torch`, `torch_fused`) replaces `auto`,
e.g. STEM_ROW_KERNEL=torch forces the fallback. The choice is logged once per optimizer.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

Kernel = Literal["auto", "cpp", "torch", "torch_fused"]
ENV_VAR = "STEM_ROW_KERNEL"
_SOURCE = Path(__file__).parent / "row_adamw.cpp"
BUILD_TIMEOUT_S = 600.0  # waiting for another rank's build; then the fallback
FALLBACK = "the torch row update, 5-10x slower per table step (benchmarks/bench_table_update.py)"
log = logging.getLogger(__name__)


class StepArgs(ctypes.Structure):
    """The fp32 scalars of one AdamW step, rounded as torch rounds its Python scalars."""

    _fields_ = [
        (n, ctypes.c_float)
        for n in (
            "wd_factor",
            "lerp_weight",
            "beta2",
            "one_minus_beta2",
            "neg_step_size",
            "bc2_sqrt",
            "eps",
        )
    ]


class SettleArgs(ctypes.Structure):
    """Exact mode's idle-step settling; `settled` None means no settling (lazy mode)."""

    _fields_ = [
        ("settled", ctypes.POINTER(ctypes.c_int64)),
        ("upto", ctypes.c_int64),
        ("base", ctypes.c_int64),
        ("step_size", ctypes.POINTER(ctypes.c_double)),
        ("inv_bc2_sqrt", ctypes.POINTER(ctypes.c_double)),
        ("decay", ctypes.POINTER(ctypes.c_double)),
        ("log_decay", ctypes.POINTER(ctypes.c_double)),
        ("tail", ctypes.c_int64),
        ("beta1_idle", ctypes.c_double),
        ("beta2_idle", ctypes.c_double),
        ("eps", ctypes.c_float),
        ("settled_to", ctypes.c_int64),
    ]


def _isa_flags() -> list[str]:
    # AVX2 + FMA where torch itself runs AVX2 or better; the flags name the cached build, so
    # a home directory shared with an older CPU gets its own baseline build.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma"]
    return []


def _name() -> str:
    return "stem_row_adamw" + ("_avx2" if _isa_flags() else "")


def build_directory() -> Path:
    """Where the kernel builds: TORCH_EXTENSIONS_DIR (else torch's default root), one folder
    per Python and torch version, as torch names its own."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    version = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return Path(root) / version / _name()


@contextlib.contextmanager
def build_lock(directory: Path, timeout_s: float = BUILD_TIMEOUT_S) -> Iterator[None]:
    """One builder at a time in `directory`; the others wait, then find the library built.
    An flock: the kernel drops it when its holder dies. torch's own lock is a file ('lock' in
    the build directory) that a builder killed mid-build leaves behind, and every later load
    waits on it forever; under this lock nobody else builds, so such a file is a leftover."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "stem_build.flock", "w") as held:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process has held the row kernel's build lock in {directory} "
                        f"for over {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.1)
        (directory / "lock").unlink(missing_ok=True)
        yield  # closing the file releases the lock


@functools.cache
def load() -> ctypes.CDLL:
    """Build (first time) and load the kernel library; raises if it cannot be built."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")  # what torch's build runs
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler '{compiler}' on this node (set CXX or install one)")
    directory = build_directory()
    with build_lock(directory):
        path = cpp_extension.load(
            _name(),
            [str(_SOURCE)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
            # -ffp-contract=off: no FMA where torch's path rounds twice; errno-free sqrt
            # vectorises.
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", *_isa_flags()],
            extra_ldflags=["-fopenmp"],
        )
    lib = ctypes.CDLL(path)
    fn = lib.stem_row_adamw
    fn.restype = None
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.POINTER(StepArgs),
        ctypes.POINTER(SettleArgs),
        ctypes.c_int,
    ]
    return lib


@functools.cache
def build_problem() -> str | None:
    """Why the kernel cannot be used on this node, or None; warns once per process."""
    try:
        load()
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
        problem = f"the C++ kernel did not build: {type(exc).__name__}: {str(exc)[:300]}"
        log.warning("SparseRowAdamW: %s; using %s", problem, FALLBACK)
        return problem
    return None


def _supports(tables: list[torch.Tensor]) -> str | None:
    """Why the kernel cannot update these tables, or None if it can."""
    for t in tables:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            return f"needs contiguous fp32 CPU tables, got {t.dtype} on {t.device}"
    return None


def select(requested: Kernel, tables: list[torch.Tensor]) -> Literal["cpp", "torch", "torch_fused"]:
    """The one place the row-update path is chosen. `cpp` asked for explicitly (argument or
    STEM_ROW_KERNEL) raises when unavailable; `auto` falls back to `torch`, saying why."""
    choice: str = requested
    if requested == "auto":
        choice = os.environ.get(ENV_VAR, "auto") or "auto"
        if choice not in ("auto", "cpp", "torch", "torch_fused"):
            raise ValueError(f"{ENV_VAR} must be cpp, torch or torch_fused, got {choice!r}")
    if choice in ("torch", "torch_fused"):
        log.info("SparseRowAdamW row update: %s (requested)", choice)
        return choice  # type: ignore[return-value]
    if choice == "auto" and tables and all(t.device.type == "cuda" for t in tables):
        # Device tables: the fused AdamW kernel on the gathered rows, one pass over them
        # instead of the ~10 of the single-tensor ops.
        log.info("SparseRowAdamW row update: torch_fused (tables on the GPU)")
        return "torch_fused"
    reason = _supports(tables)
    unbuilt = reason is None and build_problem() is not None
    reason = reason or build_problem()
    if reason is None:
        log.info("SparseRowAdamW row update: cpp kernel (%s)", _SOURCE.name)
        return "cpp"
    if choice == "cpp":
        raise RuntimeError(f"SparseRowAdamW kernel 'cpp' unavailable: {reason}")
    # build_problem() warned once already; every optimizer says which path it took
    (log.info if unbuilt else log.warning)("SparseRowAdamW row update: torch fallback (%s)", reason)
    return "torch"


def ptr(t: torch.Tensor, ctype: type) -> ctypes._Pointer:
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))
