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

`auto` (the default) picks `cpp` for fp32 CPU tables when the kernel builds, else `torch`.
The environment variable STEM_ROW_KERNEL (`cpp`, `torch`, `torch_fused`) replaces `auto`,
e.g. STEM_ROW_KERNEL=torch forces the fallback. The choice is logged once per optimizer.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Literal

import torch

Kernel = Literal["auto", "cpp", "torch", "torch_fused"]
ENV_VAR = "STEM_ROW_KERNEL"
_SOURCE = Path(__file__).parent / "row_adamw.cpp"
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


@functools.cache
def load() -> ctypes.CDLL:
    """Build (first time) and load the kernel library; raises if it cannot be built."""
    from torch.utils import cpp_extension

    isa = _isa_flags()
    name = "stem_row_adamw" + ("_avx2" if isa else "")
    path = cpp_extension.load(
        name,
        [str(_SOURCE)],
        is_python_module=False,
        verbose=False,
        # -ffp-contract=off: no FMA where torch's path rounds twice; errno-free sqrt vectorises.
        extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", *isa],
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
    reason = _supports(tables)
    if reason is None:
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
            reason = f"the C++ kernel did not build: {type(exc).__name__}: {str(exc)[:300]}"
    if reason is None:
        log.info("SparseRowAdamW row update: cpp kernel (%s)", _SOURCE.name)
        return "cpp"
    if choice == "cpp":
        raise RuntimeError(f"SparseRowAdamW kernel 'cpp' unavailable: {reason}")
    log.warning("SparseRowAdamW row update: torch fallback (%s)", reason)
    return "torch"


def ptr(t: torch.Tensor, ctype: type) -> ctypes._Pointer:
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))
