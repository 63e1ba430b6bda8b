"""What /proc says about a process: resident memory, peak, CPU time, children. Shared by the
benchmarks that measure processes (imported by the scripts beside it: a script's own folder is
on its import path)."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def memory_bytes(pid: int | str = "self") -> dict[str, int] | None:
    """Resident bytes now (VmRSS, RssAnon, RssFile + RssShmem) and the peak so far (VmHWM);
    None once the process is gone."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return {
        "rss": fields["VmRSS"],
        "hwm": fields["VmHWM"],
        "anon": fields["RssAnon"],
        "file": fields["RssFile"] + fields["RssShmem"],
    }


def reset_high_water(pid: int) -> int | None:
    """The process's peak RSS so far (bytes), then reset to its current RSS (clear_refs 5)."""
    memory = memory_bytes(pid)
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if memory is None else memory["hwm"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def children(pid: int) -> list[int]:
    try:
        return [
            int(c)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()
        ]
    except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
        return []


def children_running(launcher: int, marker: bytes) -> list[int]:
    """The children of `launcher` whose command line contains `marker`."""
    found = []
    for pid in children(launcher):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found
