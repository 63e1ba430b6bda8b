"""Start-up peak memory of one process against the dry run's plan.

A child process builds the trainer of a STEM model and stops before the first step: model
build, seeded init, DDP buffers, optimizers, prefetch staging. Cases: `medium-host` and
`medium-mmap`, configs/stem_350m.yaml's shape cut to 8 layers with 4 STEM tables of
32000 x 2560 (tables and their optimizer state dominate); `wide-mmap`, one mmap table of
32000 x 10240 (1.22 GiB, 20 init blocks) beside a small dense model, where a whole table drawn
at init would be the largest thing in RAM.

A thread samples /proc/self/status every 2 ms for anonymous and file-backed resident memory
(VmHWM: the exact peak of both together). Measured: growth over the process after its imports.
Planned (the dry run, the same config): on a CPU machine the compute device is host memory
too, so anonymous memory should reach host_total plus what the step keeps on the device (dense
weights, grads and optimizer state, table staging and cache; activations come with the first
step). File-backed memory is the mmap tables' pages; mmap_total also counts their moments'
files, which stay holes until rows are updated.

    .venv/bin/python benchmarks/bench_startup_memory.py [--cases ...] [--json out.json]

`--code DIR` runs the child on another checkout's package (e.g. an older commit unpacked with
`git archive`) against the current plan: before/after figures of one change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from proc_stats import memory_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "stem_350m.yaml"
SHORT = [
    "model.seq_length=256",
    "train.micro_batch_size=1",
    "train.global_batch_size=1",
    "train.eval_interval=0",
]
MEDIUM = ["model.num_layers=8", "stem.layers=[1,3,5,7]"]
WIDE = [
    "model.num_layers=2",
    "stem.layers=[1]",
    "model.hidden_size=256",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=10240",
]
CASES = {
    "medium-host": MEDIUM + ["stem.storage=host"],
    "medium-mmap": MEDIUM + ["stem.storage=mmap"],
    "wide-mmap": WIDE + ["stem.storage=mmap"],
}
MIB = 2**20


class PeakSampler(threading.Thread):
    """The largest anonymous and file-backed resident sizes seen while it runs."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.done = interval, threading.Event()
        self.anon = self.file = 0

    def run(self) -> None:
        while not self.done.is_set():
            now = memory_bytes()
            self.anon, self.file = max(self.anon, now["anon"]), max(self.file, now["file"])
            time.sleep(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join()


def overrides(case: str, run_dir: Path) -> list[str]:
    return SHORT + CASES[case] + [f"logging.run_dir={run_dir}"]


def child(case: str, run_dir: Path) -> dict:
    """Build the trainer in this process and report its memory (run as the child)."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    import stem_megatron
    from stem_megatron.config_loader import load_config
    from stem_megatron.parallel.state import ParallelState
    from stem_megatron.training.trainer import Trainer

    config = load_config(str(CONFIG), overrides(case, run_dir))
    parallel = ParallelState.initialize()
    base = memory_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    trainer = Trainer(config, parallel)
    seconds = time.perf_counter() - start
    sampler.stop()
    end = memory_bytes()  # with the trainer alive: what it holds after start-up
    del trainer
    return {
        "seconds": seconds,
        "peak_rss": end["hwm"] - base["rss"],
        "peak_anon": max(sampler.anon, end["anon"]) - base["anon"],
        "peak_file": max(sampler.file, end["file"]) - base["file"],
        "end_anon": end["anon"] - base["anon"],
        "end_file": end["file"] - base["file"],
        "baseline_rss": base["rss"],
        "package": str(Path(stem_megatron.__file__).parent),
    }


def plan(case: str, run_dir: Path) -> dict:
    """The dry run's bytes for the one rank of the same config."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from stem_megatron.config_loader import load_config
    from stem_megatron.planning.dry_run import dry_run

    (rank,) = dry_run(load_config(str(CONFIG), overrides(case, run_dir))).ranks
    m = rank.memory
    on_device = m.dense.resident + m.tables.device  # no activations before the first step
    return {"host_total": m.host_total, "on_device": on_device, "mmap_total": m.mmap_total}


def measure(case: str, code: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        out = Path(tmp) / "child.json"
        env = dict(os.environ)
        if code is not None:  # another checkout's package first on the path
            env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, __file__, "--child", case, "--out", str(out), "--run-dir", tmp]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        measured = json.loads(out.read_text())
        planned = plan(case, Path(tmp) / "plan")
    anon_plan = planned["host_total"] + planned["on_device"]
    result = {"case": case, "measured": measured, "plan": planned}
    result["anon_ratio"] = measured["peak_anon"] / anon_plan
    print(
        f"{case:>11}: peak anon {measured['peak_anon'] / MIB:,.0f} MiB vs plan "
        f"{anon_plan / MIB:,.0f} MiB (host {planned['host_total'] / MIB:,.0f} + device-resident "
        f"{planned['on_device'] / MIB:,.0f}) = {result['anon_ratio']:.3f}x; peak file "
        f"{measured['peak_file'] / MIB:,.0f} MiB (mmap plan {planned['mmap_total'] / MIB:,.0f});"
        f" VmHWM growth {measured['peak_rss'] / MIB:,.0f} MiB; build {measured['seconds']:.1f} s",
        flush=True,
    )
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", help="write the results to this new file")
    ap.add_argument("--code", type=Path, help="run the child on this checkout's package")
    ap.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.out.write_text(json.dumps(child(args.child, args.run_dir / "run")))
        return 0
    if args.json and Path(args.json).exists():
        print(f"error: {args.json} exists; choose a new --json path", file=sys.stderr)
        return 2
    results = [measure(case, args.code) for case in args.cases]
    if args.json:
        cases = {case: SHORT + CASES[case] for case in args.cases}
        Path(args.json).write_text(json.dumps({"cases": cases, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
