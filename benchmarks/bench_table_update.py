"""One optimizer step on a STEM table: our row-sparse AdamW vs whole-table optimizers.

A [rows, dim] fp32 table with a fraction of its rows touched per step. Compared:
- SparseRowAdamW `lazy` and `exact` (default kernel: the C++ row kernel when it builds), and
  for reference its `torch` / `torch_fused` fallbacks in lazy mode;
- torch.optim.AdamW(fused=True) over the whole table with a dense gradient (what the
  official STEM code pays every step);
- DeepSpeedCPUAdam over the whole table (if deepspeed is importable and its op builds);
- torch.optim.SparseAdam with a sparse COO gradient of the touched rows.

Touched rows are drawn per step without replacement, either Zipfian (p ~ 1/rank^1.1 with
rank = id + 1, as BPE vocabularies order tokens roughly by frequency) or uniformly. Exact
mode's cost depends on the idle steps rows owe, so its optimizer starts at global step
--start-step and first runs --history steps of the same id stream (untimed). Reported: the
median time of --repeats steps after --warmup steps; the ratio to fused AdamW of the same
run; for our row update the achieved bandwidth at 28 bytes per touched element (read p, g,
m, v; write p, m, v) and its fraction of fused AdamW's effective rate over the whole table
(28 bytes per element), the best streaming rate measured in the run.

    .venv/bin/python benchmarks/bench_table_update.py [--rows 32000 --dim 2560 --repeats 7]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from stem_megatron.stem.sparse_adam import SparseRowAdamW
from stem_megatron.timing import median_ms

BYTES_PER_ELEMENT = 28
ZIPF_EXPONENT = 1.1


def draw_rows(
    rows: int, count: int, dist: str, steps: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """`steps` sorted sets of `count` distinct row ids."""
    if dist == "uniform":
        return [torch.randperm(rows, generator=gen)[:count].sort().values for _ in range(steps)]
    probs = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** ZIPF_EXPONENT
    return [
        torch.multinomial(probs, count, replacement=False, generator=gen).sort().values
        for _ in range(steps)
    ]


def new_table(rows: int, dim: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(rows, dim) * 0.02)


def time_dense(
    make_opt: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
    rows: int,
    dim: int,
    warmup: int,
    repeats: int,
) -> float:
    table = new_table(rows, dim)
    table.grad = torch.randn(rows, dim) * 1e-3
    opt = make_opt(table)
    return median_ms(opt.step, warmup, repeats)


def deepspeed_adam() -> tuple[Callable[[torch.nn.Parameter], torch.optim.Optimizer] | None, str]:
    """DeepSpeedCPUAdam's constructor if it imports and its CPU op builds, else why not."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        probe = torch.nn.Parameter(torch.zeros(8))
        probe.grad = torch.ones(8)
        DeepSpeedCPUAdam([probe], lr=1e-3, adamw_mode=True).step()  # JIT-builds the op once
    except Exception as exc:  # noqa: BLE001 - missing package or failed build: report it
        return None, f"unavailable: {type(exc).__name__}: {str(exc)[:200]}"
    return (lambda t: DeepSpeedCPUAdam([t], lr=1e-3, weight_decay=0.1, adamw_mode=True)), "ok"


def time_sparse_row(
    mode: str,
    kernel: str,
    id_sets: list[torch.Tensor],
    grad: torch.Tensor,
    args: argparse.Namespace,
) -> float:
    table = new_table(args.rows, args.dim)
    opt = SparseRowAdamW({"u": table}, lr=1e-3, weight_decay=0.1, mode=mode, kernel=kernel)  # type: ignore[arg-type]
    zeros = torch.zeros(()).expand(*table.shape)
    opt.load_state_dict(
        {"step": args.start_step, "tables": {"u": {"exp_avg": zeros, "exp_avg_sq": zeros}}}
    )
    stream = iter(id_sets)
    if mode == "exact":
        for _ in range(args.history):
            opt.step({"u": (next(stream), grad)})
    return median_ms(lambda: opt.step({"u": (next(stream), grad)}), args.warmup, args.repeats)


def time_torch_sparse_adam(
    id_sets: list[torch.Tensor], grad: torch.Tensor, args: argparse.Namespace
) -> float:
    table = new_table(args.rows, args.dim)
    opt = torch.optim.SparseAdam([table], lr=1e-3)
    grads = iter(
        [
            torch.sparse_coo_tensor(ids[None], grad, table.shape)
            for ids in id_sets[: args.warmup + args.repeats]
        ]
    )

    def step() -> None:
        table.grad = next(grads)
        opt.step()

    return median_ms(step, args.warmup, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=2560)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.25])
    parser.add_argument(
        "--dists", nargs="+", default=["zipf", "uniform"], choices=["zipf", "uniform"]
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--history", type=int, default=250, help="untimed exact-mode steps first")
    parser.add_argument("--start-step", type=int, default=10000)
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "table_update.json"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    load_before = os.getloadavg()
    elements = args.rows * args.dim
    fused = time_dense(
        lambda t: torch.optim.AdamW([t], lr=1e-3, weight_decay=0.1, fused=True),
        args.rows,
        args.dim,
        args.warmup,
        args.repeats,
    )
    stream_gbs = elements * BYTES_PER_ELEMENT / fused / 1e6
    make_ds, ds_status = (
        (None, "skipped (--no-deepspeed)") if args.no_deepspeed else deepspeed_adam()
    )
    deepspeed_ms = (
        time_dense(make_ds, args.rows, args.dim, args.warmup, args.repeats) if make_ds else None
    )
    probe = SparseRowAdamW({"u": new_table(2, 8)})

    results = []
    steps = args.history + args.warmup + args.repeats
    for dist in args.dists:
        for fraction in args.fractions:
            count = max(1, round(fraction * args.rows))
            id_sets = draw_rows(args.rows, count, dist, steps, torch.Generator().manual_seed(0))
            grad = torch.randn(count, args.dim) * 1e-3
            row = {"dist": dist, "fraction": fraction, "touched_rows": count, "ms": {}}
            row["ms"]["exact"] = time_sparse_row("exact", "auto", id_sets, grad, args)
            for kernel in ("auto", "torch_fused", "torch"):
                row["ms"]["lazy" if kernel == "auto" else f"lazy_{kernel}"] = time_sparse_row(
                    "lazy", kernel, id_sets, grad, args
                )
            row["ms"]["torch_sparse_adam"] = time_torch_sparse_adam(id_sets, grad, args)
            touched_gb = count * args.dim * BYTES_PER_ELEMENT / 1e9
            row["speedup_vs_fused"] = {k: fused / v for k, v in row["ms"].items()}
            row["row_update_gbs"] = {
                k: touched_gb / (row["ms"][k] / 1e3) for k in ("lazy", "exact")
            }
            row["fraction_of_stream"] = {
                k: g / stream_gbs for k, g in row["row_update_gbs"].items()
            }
            results.append(row)

    out = {
        "rows": args.rows,
        "dim": args.dim,
        "threads": torch.get_num_threads(),
        "row_kernel": probe.kernel,
        "start_step": args.start_step,
        "history": args.history,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "zipf_exponent": ZIPF_EXPONENT,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "fused_adamw_ms": fused,
        "stream_gbs": stream_gbs,
        "deepspeed_cpu_adam_ms": deepspeed_ms,
        "deepspeed_status": ds_status,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print_report(out)


def print_report(out: dict) -> None:
    ds = (
        f"{out['deepspeed_cpu_adam_ms']:.1f} ms"
        if out["deepspeed_cpu_adam_ms"]
        else out["deepspeed_status"]
    )
    print(
        f"\ntable {out['rows']} x {out['dim']} fp32, {out['threads']} threads, "
        f"row kernel {out['row_kernel']}, "
        f"load avg {out['load_avg_before'][0]:.2f} -> {out['load_avg_after'][0]:.2f}"
    )
    print(
        f"whole table: AdamW(fused=True) {out['fused_adamw_ms']:.1f} ms "
        f"({out['stream_gbs']:.1f} GB/s at 28 B/element), "
        f"DeepSpeedCPUAdam {ds}"
    )
    cols = ["exact", "lazy", "lazy_torch_fused", "lazy_torch", "torch_sparse_adam"]
    print(
        "\n| rows | touched | "
        + " | ".join(f"{c} ms (x fused)" for c in cols)
        + " | lazy GB/s (of stream) | exact GB/s (of stream) |"
    )
    print("|" + "---|" * (len(cols) + 4))
    for r in out["results"]:
        cells = [f"{r['ms'][c]:.2f} ({r['speedup_vs_fused'][c]:.1f}x)" for c in cols]
        bw = [
            f"{r['row_update_gbs'][k]:.1f} ({100 * r['fraction_of_stream'][k]:.0f}%)"
            for k in ("lazy", "exact")
        ]
        print(
            f"| {r['dist']} | {100 * r['fraction']:g}% ({r['touched_rows']}) | "
            + " | ".join(cells + bw)
            + " |"
        )


if __name__ == "__main__":
    main()
