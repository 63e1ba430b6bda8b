"""Real processes for the launch tests, with a hard deadline on every wait and full cleanup.

Everything a test starts carries one environment tag. torchrun puts each worker in its own
session and SLURM's step daemons are re-parented to init, so neither a process group nor
the process tree reaches everything; the inherited tag does. Closing the scope SIGKILLs
every process that carries it, pass or fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TAG = "STEM_LAUNCH_TEST_SCOPE"


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or a kernel thread
        return {}
    return dict(
        item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
    )


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses: fields start after the last ')'.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class ProcessScope:
    """Starts commands in the tagged environment; `close()` kills all of them."""

    def __init__(self, log_dir: Path):
        self.tag = uuid.uuid4().hex
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict[str, str]:
        # PYTHON: the launchers run workers under the interpreter running the tests, not one a
        # caller's environment names (make exports its own variables to the tests).
        return {**os.environ, TAG: self.tag, "PYTHON": sys.executable, **extra}

    def start(
        self, cmd: list[str], name: str, env: dict[str, str] | None = None, **kwargs
    ) -> subprocess.Popen:
        """Run `cmd` in the background, output to `<log_dir>/<name>.log`."""
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env or self.env(),
            start_new_session=True,
            **kwargs,
        )
        log.close()  # the child holds its own copy
        proc.log_path = self.log_dir / f"{name}.log"
        self.started.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float) -> int:
        """The exit code; a hang past `timeout` fails the test with the output so far."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{proc.args} still running after {timeout} s; output:\n{output(proc)[-3000:]}"
            ) from None

    def run(self, cmd: list[str], name: str, timeout: float, **kwargs) -> tuple[int, str]:
        proc = self.start(cmd, name, **kwargs)
        return self.wait(proc, timeout), output(proc)

    def tagged(self) -> list[int]:
        return [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and int(p.name) != os.getpid()
            and environ_of(int(p.name)).get(TAG) == self.tag
        ]

    def close(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while pids := self.tagged():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for proc in self.started:  # reap our direct children
                if proc.poll() is None:
                    try:
                        proc.wait(timeout=0.2)
                    except subprocess.TimeoutExpired:
                        pass
            if time.monotonic() > deadline:
                raise AssertionError(f"processes {pids} survived SIGKILL for {timeout} s")
            time.sleep(0.1)


def output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text(errors="replace")
