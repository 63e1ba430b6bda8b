"""Bytes per training step of STEM vs the dense baseline under TP=2, with and without
sequence parallelism (SP), and of the STEM table sync under DP=2 vs what a dense
table-gradient all-reduce would move (V x d_ff/TP x 4 bytes per table). Real gloo processes
on this machine; the counts come from the trainer's comm/* metrics
(stem_megatron/parallel/comm_meter.py), measured on the last of a few steps.

The meter counts payload: the tensor each rank hands to a collective. Under SP an all-reduce
of S bytes becomes a reduce-scatter (payload S) and an all-gather (payload S/TP), which move
the same bytes on a ring; so the TP figures are also given as ring traffic per rank
(all-reduce 2(n-1)/n x payload, reduce-scatter (n-1)/n x payload, all-gather (n-1) x payload).

The data is the bundled corpus prepared under the repository root (`make data`), or any
prepared dataset given with --override data.tokenizer=... data.train_data=...
data.valid_data=...; --override also takes model sizes (the smoke test runs a tiny model).
The short runs write into a fresh temporary directory, removed at the end, unless --run-dir
names a new one to keep.

    python benchmarks/bench_comm.py [--steps 3] [--json benchmarks/results/comm.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from stem_megatron.atomic_file import write_text_atomically
from stem_megatron.config import ConfigError, DataConfig
from stem_megatron.config_loader import load_config
from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.training.short_run import train_steps

ROOT = Path(__file__).resolve().parents[1]

# A small STEM model on the bundled corpus (vocab 8192): 4 layers, STEM in layers 1 and 3.
MODEL = [
    "model.num_layers=4",
    "model.hidden_size=128",
    "model.ffn_hidden_size=512",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.seq_length=128",
    "train.micro_batch_size=4",
    "train.global_batch_size=16",
    "train.train_iters=100",
    "stem.layers=[1,3]",
]
# The config's data defaults are relative to the working directory; here, to the repository.
_DEFAULTS = DataConfig()
BUNDLED_DATA = [
    f"data.tokenizer={ROOT / _DEFAULTS.tokenizer}",
    f"data.train_data={ROOT / _DEFAULTS.train_data}",
    f"data.valid_data={ROOT / _DEFAULTS.valid_data}",
]
TP2 = ["parallel.tensor_model_parallel_size=2"]
SP = ["parallel.sequence_parallel=true"]
DENSE = ["stem.enabled=false"]
RUNS = {  # name -> (processes, overrides)
    "tp2_stem": (2, TP2),
    "tp2_dense": (2, TP2 + DENSE),
    "tp2_sp_stem": (2, TP2 + SP),
    "tp2_sp_dense": (2, TP2 + SP + DENSE),
    "dp2_replicated": (2, ["stem.dp_layout=replicated"]),
    "dp2_vocab_sharded": (2, ["stem.dp_layout=vocab_sharded"]),
}


def missing_data(overrides: list[str]) -> list[str]:
    """The data files the runs would read that do not exist."""
    data = load_config(None, overrides).data
    files = [Path(data.tokenizer)] + [
        Path(f"{prefix}{ext}")
        for prefix in (data.train_data, data.valid_data)
        if prefix
        for ext in (".bin", ".idx")
    ]
    return [str(f) for f in files if not f.exists()]


def measure(world: int, overrides: list[str], steps: int) -> dict:
    """Rank 0's comm metrics of the last step, its unique rows, and the parameter counts; the
    table size is the whole table's, wherever its rows live."""
    results = run_local_workers(world, train_steps, overrides, steps)
    first = results[0]
    tables = first["counts"]["table_params"]
    if first["layout"]["dp_layout"] == "vocab_sharded":  # each DP rank holds a block of rows
        tables = sum(
            r["counts"]["table_params"]
            for r in results
            if r["layout"]["tp_rank"] == first["layout"]["tp_rank"]
        )
    return {
        **first["comm"],
        "unique_rows": first["unique_rows"],
        "dense_params": first["counts"]["dense_params"],
        "table_params": tables,
    }


def ring_bytes(run: dict, world: int = 2) -> float:
    """Bytes one rank sends on a ring for the counted collectives (all in the TP group in the
    TP=2 runs, apart from a few scalar reductions)."""
    n = world
    return (
        run["comm/all_reduce_bytes"] * 2 * (n - 1) / n
        + run["comm/reduce_scatter_bytes"] * (n - 1) / n
        + run["comm/all_gather_bytes"] * (n - 1)
    )


def report(rows: dict[str, dict]) -> dict[str, float]:
    """Print the comparisons; returns the summary figures."""
    print("TP=2, bytes per step on one rank (tensor-parallel collectives)")
    print(
        f"  {'run':<14}{'payload':>14}{'all-reduce':>14}{'reduce-scat.':>14}"
        f"{'all-gather':>14}{'ring traffic':>14}"
    )
    summary = {}
    for sp in ("", "_sp"):
        stem, dense = rows[f"tp2{sp}_stem"], rows[f"tp2{sp}_dense"]
        for name in (f"tp2{sp}_stem", f"tp2{sp}_dense"):
            r = rows[name]
            summary[f"{name}_ring_bytes"] = ring_bytes(r)
            print(
                f"  {name:<14}{r['comm/tp_bytes']:>14,.0f}{r['comm/all_reduce_bytes']:>14,.0f}"
                f"{r['comm/reduce_scatter_bytes']:>14,.0f}{r['comm/all_gather_bytes']:>14,.0f}"
                f"{summary[f'{name}_ring_bytes']:>14,.0f}"
            )
        summary[f"tp2{sp}_stem_over_dense"] = stem["comm/tp_bytes"] / dense["comm/tp_bytes"]
        summary[f"tp2{sp}_stem_added_bytes"] = stem["comm/tp_bytes"] - dense["comm/tp_bytes"]
    summary["tp2_sp_over_no_sp_ring"] = (
        summary["tp2_sp_stem_ring_bytes"] / summary["tp2_stem_ring_bytes"]
    )
    print(
        f"  STEM adds {summary['tp2_stem_added_bytes']:,.0f} bytes without SP, "
        f"{summary['tp2_sp_stem_added_bytes']:,.0f} with SP; SP / no SP ring traffic = "
        f"{summary['tp2_sp_over_no_sp_ring']:.3f} (SP all-gathers each column-parallel "
        f"input again in the backward for the weight gradient, as megatron-core does, "
        f"instead of keeping the gathered input)"
    )
    print("\nDP=2, STEM table sync bytes per step on one rank vs a dense table-gradient sync")
    print(
        f"  {'layout':<20}{'unique rows':>12}{'table sync':>14}{'dense sync':>14}{'ratio':>9}"
        f"{'dp-dense':>14}"
    )
    for layout in ("dp2_replicated", "dp2_vocab_sharded"):
        r = rows[layout]
        dense_sync = 4 * r["table_params"]  # every table element, fp32, all-reduced
        ratio = r["comm/dp_stem_bytes"] / dense_sync
        summary[f"{layout}_table_sync_bytes"] = r["comm/dp_stem_bytes"]
        summary[f"{layout}_dense_table_sync_bytes"] = dense_sync
        summary[f"{layout}_over_dense_table_sync"] = ratio
        print(
            f"  {layout:<20}{r['unique_rows']:>12,.0f}{r['comm/dp_stem_bytes']:>14,.0f}"
            f"{dense_sync:>14,.0f}{ratio:>9.4f}{r['comm/dp_dense_bytes']:>14,.0f}"
        )
    summary["all_to_all_bytes"] = sum(r["comm/all_to_all_bytes"] for r in rows.values())
    print(f"\nall-to-all bytes over all runs: {summary['all_to_all_bytes']:,.0f}")
    return summary


def check_run_dir(given: str | None) -> str | None:
    """Why `given` cannot hold the short runs (None: it can): it must be new or empty."""
    if (
        given is not None
        and Path(given).exists()
        and (not Path(given).is_dir() or any(Path(given).iterdir()))
    ):
        return (
            f"--run-dir {given} exists and is not an empty directory: name a new one, or "
            f"leave --run-dir out for a temporary directory"
        )
    return None


@contextlib.contextmanager
def run_directory(given: str | None):
    """The parent of the short runs' directories: `given` (kept), or a new temporary
    directory, removed at the end."""
    if given is not None:
        print(f"run dir: {given} (kept)", flush=True)
        yield Path(given)
        return
    with tempfile.TemporaryDirectory(prefix="bench_comm_") as tmp:
        print(f"run dir: {tmp} (removed at the end)", flush=True)
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/comm.json"))
    ap.add_argument(
        "--run-dir",
        default=None,
        help="keep the short runs here (a new directory); default: a temporary one",
    )
    ap.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="extra section.key=value overrides for every run (data, model sizes)",
    )
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    base = MODEL + BUNDLED_DATA + args.override
    try:
        missing = missing_data(base)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if missing:
        print(
            f"error: data files missing: {', '.join(missing)}. Run `make data` (or "
            f"`python tools/prepare_corpus.py`) for the bundled corpus, or pass prepared data "
            f"with --override data.tokenizer=... data.train_data=... data.valid_data=...",
            file=sys.stderr,
        )
        return 1
    if (problem := check_run_dir(args.run_dir)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    rows = {}
    with run_directory(args.run_dir) as run_dir:
        for name, (world, overrides) in RUNS.items():
            print(f"measuring {name} ({world} processes, {args.steps} steps)", flush=True)
            rows[name] = measure(
                world, base + overrides + [f"logging.run_dir={run_dir / name}"], args.steps
            )
    print()
    summary = report(rows)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(
        out,
        json.dumps(
            {
                "model": MODEL,
                "override": args.override,
                "steps": args.steps,
                "runs": rows,
                "summary": summary,
            },
            indent=2,
        ),
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
