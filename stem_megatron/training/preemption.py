"""Stop cleanly when the scheduler asks: SIGTERM (preemption, `scontrol requeue`, the end
of a time limit) or SIGUSR1 (`sbatch --signal=USR1@N`) makes training save a checkpoint at
the next step boundary and return, so a requeued job resumes from there instead of from the
last periodic checkpoint.

Ranks receive the signal at slightly different times; all of them must stop after the same
step, so the flag is agreed on with an all-reduce (max) at every step boundary.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals go to main only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received a stop signal."""
        flag = torch.tensor(0 if self.received is None else 1, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a peer rank's signal"
