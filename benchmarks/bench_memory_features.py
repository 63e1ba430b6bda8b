"""Step time and peak RSS of each memory/throughput feature on vs off, on CPU, in one run.

Every configuration trains for a few steps as users launch it (`launch/torchrun.sh NPROC
CONFIG overrides`), in a fresh run directory, and is measured after its first --warmup steps:
- step time: the median of tokens per step / `throughput/tokens_per_s` (metrics.jsonl, logged
  every step): wall time, which follows the load of a shared machine;
- step CPU s: the ranks' CPU seconds (/proc/PID/stat) from one step's line to the next, summed,
  which a loaded machine's waits do not inflate;
- peak RSS: each rank's VmHWM (/proc/PID/status), reset once the warmup steps ended (clear_refs)
  and read while the run is still in its last step: the steady training peak, without the
  model build's transients or the end-of-run checkpoint save. The largest over the ranks is
  reported (what one device would hold); the peak before the reset as startup_peak_rss_mib.
Each feature is compared with the same layout without it ("x off"), and every row with the
one-process all-off baseline.

The features (Megatron's names): train.bf16; model.recompute_granularity full / selective;
optim.use_distributed_optimizer (DP=2); parallel.overlap_grad_reduce (DP=2);
parallel.sequence_parallel (TP=2); optim.optimizer_cpu_offload (on the bf16 distributed
optimizer, which it needs). A configuration that fails is reported with its error line, and
the others still run.

On CPU this measures what CPU runs pay; see benchmarks/RESULTS.md for what only a GPU shows (bf16
tensor-core matmuls, overlap of the grad reduce with the backward, PCIe traffic of offload).

    .venv/bin/python benchmarks/bench_memory_features.py [--models tiny 100m --steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_stats import children_running, cpu_seconds, memory_bytes, reset_high_water

from stem_megatron.atomic_file import write_text_atomically
from stem_megatron.config import ConfigError
from stem_megatron.config_loader import load_config

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "configs" / "tiny.yaml"

MODELS = {
    "tiny": [],  # configs/tiny.yaml as shipped: 25M total / 6M active parameters
    # ~117M total / ~50M dense parameters: 8 layers of width 768, STEM in layers 1, 3, 5, 7.
    "100m": [
        "model.num_layers=8",
        "model.hidden_size=768",
        "model.ffn_hidden_size=2048",
        "model.num_attention_heads=12",
        "model.num_query_groups=4",
        "model.seq_length=128",
        "stem.layers=[1,3,5,7]",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
    ],
}
BF16, DIST_OPT = "train.bf16=true", "optim.use_distributed_optimizer=true"
TP2 = "parallel.tensor_model_parallel_size=2"
# name -> (processes, overrides, the configuration it is compared with: the same without
# the feature)
VARIANTS = {
    "baseline": (1, [], None),
    "bf16": (1, [BF16], "baseline"),
    "recompute_full": (
        1,
        [
            "model.recompute_granularity=full",
            "model.recompute_method=uniform",
            "model.recompute_num_layers=1",
        ],
        "baseline",
    ),
    "recompute_selective": (1, ["model.recompute_granularity=selective"], "baseline"),
    "dp2": (2, [], "baseline"),
    "dp2_distributed_optimizer": (2, [DIST_OPT], "dp2"),
    "dp2_overlap_grad_reduce": (2, ["parallel.overlap_grad_reduce=true"], "dp2"),
    "tp2": (2, [TP2], "baseline"),
    "tp2_sequence_parallel": (2, [TP2, "parallel.sequence_parallel=true"], "tp2"),
    "bf16_distributed_optimizer": (1, [BF16, DIST_OPT], "bf16"),
    "bf16_distributed_optimizer_offload": (
        1,
        [BF16, DIST_OPT, "optim.optimizer_cpu_offload=true"],
        "bf16_distributed_optimizer",
    ),
}
POLL_S = 0.05


def high_water_kib(pid: int) -> int | None:
    memory = memory_bytes(pid)
    return None if memory is None else memory["hwm"] // 1024


def logged_steps(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    lines = metrics.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]  # a line being written is not


def run_config(
    processes: int,
    overrides: list[str],
    run_dir: Path,
    steps: int,
    warmup: int,
    threads: int,
    timeout: float,
) -> dict:
    """Train `steps` steps. Returns the logged step records, the ranks' CPU seconds summed when
    each step's line appeared, and each rank's peak RSS before the final save; or the
    failure's most telling line."""
    cmd = [
        "bash",
        str(ROOT / "launch" / "torchrun.sh"),
        str(processes),
        str(CONFIG),
        *overrides,
        *run_overrides(steps, run_dir),
        "--sample-prompt",
        "",
    ]
    metrics = run_dir / "metrics.jsonl"
    log = run_dir.with_suffix(".log")
    startup: dict[int, int] = {}  # rank -> peak RSS until its first --warmup steps ended
    peak: dict[int, int] = {}  # rank -> peak RSS of the steps after them, before the save
    cpu_at: dict[int, float] = {}  # steps logged -> the ranks' CPU seconds when first seen
    deadline = time.monotonic() + timeout
    with log.open("w") as out:
        # Its own session: a timeout kills the launcher and its workers together.
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": str(threads)},
            start_new_session=True,
        )
        while proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            # The high-water marks first, then the log: if the last step is still unlogged,
            # the marks were read before the save began.
            ranks = children_running(proc.pid, b"stem_megatron.train")  # torchrun's workers
            marks = {pid: high_water_kib(pid) for pid in ranks if pid in startup}
            cpu = sum(cpu_seconds(pid) for pid in ranks)
            done = logged_steps(metrics)
            if not done or done[-1]["step"] < steps:
                peak.update({pid: kib for pid, kib in marks.items() if kib})
            if len(done) >= warmup:  # start-up (model build, first steps) over: measure from here
                for pid in ranks:
                    if pid not in startup and (peak_bytes := reset_high_water(pid)):
                        startup[pid] = peak_bytes // 1024
            if len(ranks) == processes:  # all ranks still running: their CPU time counts
                cpu_at.setdefault(len(done), cpu)
            time.sleep(POLL_S)
    records = [r for r in logged_steps(metrics) if "throughput/tokens_per_s" in r]
    if proc.returncode == 0 and len(records) == steps and len(peak) == processes:
        return {
            "records": records,
            "cpu_at": cpu_at,
            "peak_rss_kib": sorted(peak.values()),
            "startup_rss_kib": sorted(startup.values()),
        }
    if proc.returncode == 0:
        return {
            "failed": f"{len(records)} of {steps} steps logged, RSS of {len(peak)} of "
            f"{processes} ranks sampled"
        }
    lines = [line.strip() for line in log.read_text().splitlines() if line.strip()]
    why = next(
        (line for line in reversed(lines) if "error" in line.lower()),
        lines[-1] if lines else "no output",
    )
    ended = "timed out" if proc.returncode < 0 else f"exit {proc.returncode}"
    return {"failed": f"{ended}: {why[:300]}"}


def run_overrides(steps: int, run_dir: Path) -> list[str]:
    """A short run: every step logged, no evaluation, one checkpoint at the end (not measured)."""
    return [
        f"train.train_iters={steps}",
        "optim.lr_warmup_iters=1",
        "train.eval_interval=0",
        "data.valid_data=null",
        "logging.log_interval=1",
        "checkpoint.save_interval=0",
        f"logging.run_dir={run_dir}",
    ]


def measure(overrides: list[str], processes: int, run_dir: Path, args: argparse.Namespace) -> dict:
    try:  # a configuration the config refuses is reported without a launch
        config = load_config(CONFIG, [*overrides, *run_overrides(args.steps, run_dir)])
    except ConfigError as exc:
        return {"status": f"refused by the config: {exc}"}
    raw = run_config(
        processes, overrides, run_dir, args.steps, args.warmup, args.threads, args.timeout
    )
    if "failed" in raw:
        return {"status": raw["failed"]}
    tokens = config.train.global_batch_size * config.model.seq_length
    step_s = [tokens / r["throughput/tokens_per_s"] for r in raw["records"]]
    # CPU seconds from one step's line to the next (the first step's include the start-up;
    # the last step's are missing if the ranks exit before a poll sees its line).
    cpu_at = raw["cpu_at"]
    cpu_s = [
        cpu_at[n] - cpu_at[n - 1]
        for n in range(args.warmup + 1, args.steps + 1)
        if n in cpu_at and n - 1 in cpu_at
    ]
    first = raw["records"][0]
    return {
        "status": "ok",
        "step_s": step_s,
        "median_step_s": statistics.median(step_s[args.warmup :]),
        "step_cpu_s": cpu_s,
        "median_step_cpu_s": statistics.median(cpu_s) if cpu_s else None,
        "peak_rss_mib": max(raw["peak_rss_kib"]) / 1024,
        "startup_peak_rss_mib": max(raw["startup_rss_kib"]) / 1024,
        "rank_peak_rss_mib": [kib / 1024 for kib in raw["peak_rss_kib"]],
        "params_total": first.get("params/total"),
        "params_active": first.get("params/active"),
    }


def with_comparisons(chosen: list[str]) -> list[str]:
    """`chosen`, the configurations each is compared with (and theirs), and the baseline, in
    VARIANTS' order: the baseline first."""
    needed = {"baseline"}
    for name in chosen:
        while name is not None:
            needed.add(name)
            name = VARIANTS[name][2]
    return [name for name in VARIANTS if name in needed]


def add_ratios(rows: dict[str, dict]) -> None:
    """Each ok row against the configuration without its feature and against the baseline."""
    for name, row in rows.items():
        compared = VARIANTS[name][2]
        for key, other in (("vs_off", compared), ("vs_baseline", "baseline")):
            ref = rows.get(other) if other else None
            if row["status"] == "ok" and ref is not None and ref["status"] == "ok":
                row[f"step_time_{key}"] = row["median_step_s"] / ref["median_step_s"]
                row[f"peak_rss_{key}"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
                if row["median_step_cpu_s"] and ref["median_step_cpu_s"]:
                    row[f"step_cpu_{key}"] = row["median_step_cpu_s"] / ref["median_step_cpu_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["all"],
        choices=["all", *VARIANTS],
        help="configurations to run (default: all); the baseline and the "
        "configurations they are compared with run too",
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="steps per run, --warmup of them untimed"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per rank (OMP_NUM_THREADS); with 1, CPU time is work, "
        "not threads spinning while a loaded machine runs others",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="section.key=value for every run (the smoke test: a small model and corpus)",
    )
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "memory_features.json"
    )
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:  # CPU time per step starts after the first line
        parser.error(
            f"--warmup must be in [1, --steps): got {args.warmup} with --steps {args.steps}"
        )
    variants = with_comparisons(list(VARIANTS) if "all" in args.variants else args.variants)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_features.") as scratch:
        for model in args.models:
            rows = {}
            for name in variants:
                processes, overrides, _ = VARIANTS[name]
                run_dir = Path(scratch) / f"{model}-{name}"
                rows[name] = {
                    "processes": processes,
                    "overrides": overrides,
                    **measure(
                        [*MODELS[model], *args.override, *overrides], processes, run_dir, args
                    ),
                }
                shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoint: up to GBs at 100M
                print(f"{model} {name}: {rows[name]['status']}", flush=True)
            add_ratios(rows)
            results[model] = rows
    out = {
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "cores": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "models": {m: MODELS[m] + args.override for m in args.models},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.json, json.dumps(out, indent=2) + "\n")
    print_report(out)


def print_report(out: dict) -> None:
    print(
        f"\n{out['steps']} steps per run ({out['warmup']} untimed), {out['cores']} cores, "
        f"load avg {out['load_avg_before'][0]:.1f} -> {out['load_avg_after'][0]:.1f}; ratios: "
        "the feature on / the same layout off (x off), and / the one-process baseline (x base). "
        "Wall step time follows the machine's load; CPU s is the ranks' CPU time per step, summed"
    )
    print(
        "\n| model | configuration | procs | step s | x off | x base | step CPU s | x off | x base "
        "| peak RSS MiB | x off | x base |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, rows in out["results"].items():
        for name, r in rows.items():
            if r["status"] != "ok":
                print(f"| {model} | {name} | {r['processes']} | {r['status']} |" + " |" * 8)
                continue
            cells = [
                f"{r['median_step_s']:.2f}",
                *ratio_cells(r, "step_time"),
                f"{r['median_step_cpu_s']:.2f}" if r["median_step_cpu_s"] else "-",
                *ratio_cells(r, "step_cpu"),
                f"{r['peak_rss_mib']:.0f}",
                *ratio_cells(r, "peak_rss"),
            ]
            print(f"| {model} | {name} | {r['processes']} | " + " | ".join(cells) + " |")


def ratio_cells(row: dict, figure: str) -> list[str]:
    return [
        f"{row[key]:.2f}" if key in row else "-"
        for key in (f"{figure}_vs_off", f"{figure}_vs_baseline")
    ]


if __name__ == "__main__":
    main()
