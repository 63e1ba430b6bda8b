"""Training progress for humans: a tqdm bar on a terminal, one plain line per log
interval otherwise (SLURM logs, `| tee`, CI).

Plain line (stdout, flushed), fields `name value` separated by ` | `, the step padded to
the width of train_iters so columns line up (one line, wrapped here):
    step   100/2000 | loss 4.1234 | lr 3.00e-04 | grad_norm 0.812 | tok/s 12,345
    | elapsed 0:01:23 | eta 0:20:11
`loss` is what the caller reports (the trainer: the mean over the log window, as logged),
`tok/s` the interval's throughput, `lr` and
`grad_norm` the last values (omitted when not given). `eta` comes from the average time
per step since this object was created, so on a resumed run it counts only the steps
this run has done and the steps left. `grep '^step '` selects the lines.

The bar is on stderr; `message()` writes eval results and the like to stdout through
`tqdm.write`, which keeps the bar intact. Create it enabled on rank 0 only.
"""

from __future__ import annotations

import sys
from time import monotonic
from types import TracebackType

from tqdm import tqdm


class TrainingProgress:
    """Reports training progress; call `update()` once per completed iteration.

    Args:
        train_iters: total iterations of the run.
        start_step: iterations already done when this run starts (resume), else 0.
        log_interval: print a plain line every `log_interval` steps (and at the last).
        enabled: False on every rank but 0; then all calls are no-ops.
    """

    def __init__(
        self,
        train_iters: int,
        start_step: int = 0,
        log_interval: int = 1,
        enabled: bool = True,
    ) -> None:
        if log_interval < 1:
            raise ValueError(f"log_interval={log_interval} must be >= 1")
        if not 0 <= start_step <= train_iters:
            raise ValueError(f"start_step={start_step} must be in [0, train_iters={train_iters}]")
        self.train_iters = train_iters
        self.start_step = start_step
        self.log_interval = log_interval
        self.enabled = enabled
        self._start_time = monotonic()
        self._interval_start = self._start_time
        self._interval_tokens = 0
        self._bar: tqdm | None = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(
                total=train_iters,
                initial=start_step,  # tqdm's rate and ETA then count only new steps
                file=sys.stderr,
                unit="it",
                dynamic_ncols=True,
            )

    def update(
        self,
        step: int,
        *,
        loss: float,
        tokens: int,
        lr: float | None = None,
        grad_norm: float | None = None,
    ) -> None:
        """Record that iteration `step` (1-based count of completed iterations) is done.

        `tokens` is the number of tokens the iteration trained on across all ranks, so
        tok/s is the job's throughput; `loss` is shown as given.
        """
        if not self.enabled:
            return
        if step <= self.start_step:
            raise ValueError(f"step={step} must be > start_step={self.start_step}")
        now = monotonic()
        self._interval_tokens += tokens
        tokens_per_s = self._interval_tokens / max(now - self._interval_start, 1e-9)

        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s", refresh=False)
            self._bar.update(step - self._bar.n)
        elif step % self.log_interval == 0 or step == self.train_iters:
            elapsed = now - self._start_time
            eta = elapsed / (step - self.start_step) * (self.train_iters - step)
            fields = [
                f"step {step:>{len(str(self.train_iters))}}/{self.train_iters}",
                f"loss {loss:.4f}",
            ]
            if lr is not None:
                fields.append(f"lr {lr:.2e}")
            if grad_norm is not None:
                fields.append(f"grad_norm {grad_norm:.3f}")
            fields += [
                f"tok/s {tokens_per_s:,.0f}",
                f"elapsed {_hms(elapsed)}",
                f"eta {_hms(eta)}",
            ]
            print(" | ".join(fields), flush=True)

        if step % self.log_interval == 0:
            self._interval_start = now
            self._interval_tokens = 0

    def message(self, text: str) -> None:
        """Print a line (e.g. `step 100 | val_loss 4.0000`) without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            tqdm.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _hms(seconds: float) -> str:
    """0:01:23; hours keep counting past a day so the field stays one token."""
    total = int(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"
