"""Mutation check: break the code in one place at a time and run the tests that must notice.

Each mutant of tools/dev/mutants.yaml replaces one exact snippet of one file; the tests it
names must then fail (pytest exit 1). A mutant whose tests pass is "missed"; one whose tests
cannot run (exit 2-5: collection error, no tests) is "error". First the tests of every chosen
mutant run on the unmodified code and must pass, or nothing is reported as caught.

Mutants are applied to a scratch copy of the working tree (tracked and untracked files git
does not ignore), never to the checkout, so tests run meanwhile from the checkout see the real
code. The file is restored after every mutant whatever happens, and its hash checked.

    .venv/bin/python tools/dev/mutants.py                  # every mutant (minutes)
    .venv/bin/python tools/dev/mutants.py --only sync      # mutants whose name contains "sync"
    .venv/bin/python tools/dev/mutants.py --list

Exit status: 0 when every mutant was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MUTANTS = Path(__file__).with_suffix(".yaml")


@dataclass
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: list[str]


def load_mutants(path: Path = MUTANTS) -> list[Mutant]:
    return [Mutant(**entry) for entry in yaml.safe_load(path.read_text())["mutants"]]


def occurrences(mutant: Mutant, root: Path = ROOT) -> int:
    return (root / mutant.file).read_text().count(mutant.original)


def scratch_copy(dest: Path) -> None:
    """The working tree's files git does not ignore, plus the prepared corpus (ignored)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    prepared = ROOT / "data/prepared"
    if prepared.is_dir():
        (dest / "data").mkdir(exist_ok=True)
        (dest / "data/prepared").symlink_to(prepared)


def pytest(tree: Path, tests: list[str], timeout: float) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        return subprocess.run(
            cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout
        ).returncode
    except subprocess.TimeoutExpired:
        return 124


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_mutant(tree: Path, mutant: Mutant, timeout: float) -> str:
    path = tree / mutant.file
    original = path.read_bytes()
    text = original.decode()
    if text.count(mutant.original) != 1:
        return "stale"  # the snippet is gone or ambiguous: fix the list
    try:
        path.write_text(text.replace(mutant.original, mutant.replacement))
        rc = pytest(tree, mutant.tests, timeout)
    finally:
        path.write_bytes(original)
        if digest(path.read_bytes()) != digest(original):
            raise RuntimeError(f"{mutant.file} was not restored")
    return {0: "missed", 1: "caught"}.get(rc, f"error (pytest exit {rc})")


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: the `finally` restoring a file runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds for one mutant's tests"
    )
    args = parser.parse_args(argv)
    mutants = [m for m in load_mutants() if args.only in m.name]
    if not mutants:
        parser.error(f"no mutant's name contains {args.only!r} (see --list)")
    if args.list:
        for m in mutants:
            print(f"{m.name}  [{m.file}]")
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        tree = Path(scratch)
        scratch_copy(tree)
        every_test = list(dict.fromkeys(t for m in mutants for t in m.tests))
        rc = pytest(tree, every_test, args.timeout * len(mutants))
        if rc != 0:
            print(
                f"error: the guarding tests fail on the unmodified code (pytest exit {rc}); "
                f"run them: pytest {' '.join(every_test)}"
            )
            return 1
        missed = 0
        for m in mutants:
            start = time.monotonic()
            outcome = run_mutant(tree, m, args.timeout)
            missed += outcome != "caught"
            print(
                f"{outcome:>8}  {m.name}  [{m.file}]  ({time.monotonic() - start:.0f} s)",
                flush=True,
            )
    print(f"{len(mutants) - missed} of {len(mutants)} mutants caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
