"""The median time of a callable, shared by the benchmarks (benchmarks/bench_*.py): scripts
run by path import each other only through the installed package."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(
    step: Callable[[], None],
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median milliseconds of `step` by `clock` (time.process_time: CPU time, which a loaded
    machine's waits do not inflate)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)
