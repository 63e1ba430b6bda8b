"""Scalar metrics: TensorBoard events under `<run_dir>/tb/` and `<run_dir>/metrics.jsonl`.

One JSON object per logged step, tag names as keys:
    {"step": 100, "loss/train": 4.12, "optim/lr": 0.0003, ...}
Tags follow the groups in DESIGN.md (`loss/`, `optim/`, `throughput/`, `memory/`,
`stem/`). Non-finite values are written as Python's json writes them (NaN, Infinity):
a diverged loss must stay visible; `json.loads` and pandas read them back.

`step` is the trainer's count of completed iterations, the same number checkpoints
(`step_N/`) and progress lines use. On resume from step k, call `truncate_after(k)`
before logging: the steps after k that the crashed run logged are dropped from the jsonl
and hidden in TensorBoard, so the resumed run's metrics have no duplicate steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import torch
from torch.utils.tensorboard import SummaryWriter

from stem_megatron.atomic_file import write_text_atomically

MetricValue = float | int | torch.Tensor | None


class MetricsLogger:
    """Writes scalars to TensorBoard and metrics.jsonl; owned by the trainer.

    With `enabled=False` (non-zero ranks) every call is a no-op and nothing is created.
    Files are opened at the first `log()`, so an enabled logger that never logs leaves
    no empty event file behind either.
    """

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb_dir = self.run_dir / "tb"
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._writer: SummaryWriter | None = None
        self._jsonl: IO[str] | None = None
        # Set by truncate_after: TensorBoard hides events at steps >= purge_step that
        # older event files hold (the crashed run's tail).
        self._purge_step: int | None = None

    def log(self, step: int, metrics: dict[str, MetricValue]) -> None:
        """Log scalar `metrics` at `step`; None values are skipped.

        Tensors must hold one element; `.item()` synchronises with the device, so log
        at log_interval, not every micro-batch.
        """
        if not self.enabled:
            return
        values = {tag: _to_float(tag, v) for tag, v in metrics.items() if v is not None}
        if not values:
            return
        writer, jsonl = self._open()
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step)
        jsonl.write(json.dumps({"step": step, **values}) + "\n")
        # Flush per line: a crash loses nothing already logged. (flush, not fsync: this
        # protects against the process dying, which is the common case, at no cost.)
        jsonl.flush()
        writer.flush()

    def truncate_after(self, step: int) -> None:
        """Forget everything logged after `step` (call on resume from checkpoint `step`).

        Rewrites metrics.jsonl without lines whose step is > `step` (and without a torn
        last line from a crash mid-write), atomically, and makes TensorBoard hide the
        older event files' events after `step`.
        """
        if not self.enabled:
            return
        self._close_files()
        self._purge_step = step + 1
        if not self.jsonl_path.exists():
            return
        kept = []
        with open(self.jsonl_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash mid-write
                if record["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        # never leave a half-written metrics file
        write_text_atomically(self.jsonl_path, "".join(kept))

    def close(self) -> None:
        self._close_files()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self) -> tuple[SummaryWriter, IO[str]]:
        if self._writer is None or self._jsonl is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
            self._writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=self._purge_step)
            self._purge_step = None
        return self._writer, self._jsonl

    def _close_files(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _to_float(tag: str, value: float | int | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {tag!r}: expected a scalar, got a tensor of shape {tuple(value.shape)}"
            )
        return float(value.item())
    return float(value)


@dataclass
class LossWindow:
    """The train losses since the last logged step; the logged `loss/train` is their mean.
    Checkpoints carry it, so a run resumed between two logged steps logs the mean the
    uninterrupted run logs (a float sum in JSON round-trips exactly)."""

    loss_sum: float = 0.0
    steps: int = 0

    def add(self, loss: float) -> None:
        self.loss_sum += loss
        self.steps += 1

    @property
    def mean(self) -> float:
        return self.loss_sum / self.steps

    def take(self) -> float:
        """The window's mean loss; starts the next window."""
        mean = self.mean
        self.loss_sum, self.steps = 0.0, 0
        return mean

    def state_dict(self) -> dict[str, float | int]:
        return {"loss_sum": self.loss_sum, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.loss_sum, self.steps = float(state["loss_sum"]), int(state["steps"])
