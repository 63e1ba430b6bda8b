"""Training step time with host-resident STEM tables (`stem.storage=host`, rows prefetched),
with and without the hot-row cache, against device tables; on configs/tiny.yaml and on a
~100M-parameter STEM model defined here by overrides.

The three variants are real trainers on the prepared corpus (`python tools/prepare_corpus.py`)
built side by side; each repeat runs one training step of each in turn (the order rotating
between repeats), so a load change on the shared machine hits all of them alike. Reported
per variant: median step time, and means over the timed steps of prefetch stall, bytes
host -> device and cache hit rate; then host / device ratios. Target: host step time
<= 1.10x device. A second group runs without gradient clipping, where host-table updates can
overlap the backward (stem/overlap.py): host with the update after the backward, and
overlapped, each against device without clipping.

    .venv/bin/python benchmarks/bench_host_tables.py [--models tiny 100m] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
from stem_megatron.config_loader import load_config
from stem_megatron.parallel.state import ParallelState
from stem_megatron.stem.storage import synchronize
from stem_megatron.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

# ~100M parameters: 8 layers, hidden 512, d_ff 2048, vocab 8192 (the prepared tokenizer's),
# STEM in the 4 odd layers; 2 micro-batches of 2 x 128 tokens keep a CPU step to seconds.
MODELS = {
    # configs/tiny.yaml with 4 micro-batches of 2 x 256 tokens
    "tiny": ["train.micro_batch_size=2", "train.global_batch_size=8"],
    "100m": [
        "model.num_layers=8",
        "model.hidden_size=512",
        "model.ffn_hidden_size=2048",
        "model.num_attention_heads=8",
        "model.num_query_groups=4",
        "model.seq_length=128",
        "model.vocab_size=8192",
        "stem.layers=[1,3,5,7]",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
    ],
}
NO_CLIP = ["optim.clip_grad=0"]  # lets host-table updates overlap the backward
VARIANTS = {
    "device": ["stem.storage=device"],
    "host": ["stem.storage=host"],
    "host_cache": ["stem.storage=host"],  # + stem.cache_rows from --cache-rows
    # Without clipping: the update after the backward vs overlapped with it.
    "device_noclip": ["stem.storage=device", *NO_CLIP],
    "host_noclip": ["stem.storage=host", "stem.optimizer.overlap_update=false", *NO_CLIP],
    "host_overlap": ["stem.storage=host", *NO_CLIP],
}


def build(
    model: str,
    variant: str,
    cache_rows: int,
    extra: list[str],
    run_dir: Path,
    parallel: ParallelState,
) -> Trainer:
    overrides = (
        MODELS[model]
        + VARIANTS[variant]
        + extra
        + [f"logging.run_dir={run_dir / model / variant}", "train.eval_interval=0"]
    )
    if variant == "host_cache":
        overrides.append(f"stem.cache_rows={cache_rows}")
    return Trainer(load_config(ROOT / "configs" / "tiny.yaml", overrides), parallel)


def bench_model(
    model: str, args: argparse.Namespace, run_dir: Path, parallel: ParallelState
) -> dict:
    trainers = {
        v: build(model, v, args.cache_rows, args.override, run_dir, parallel) for v in VARIANTS
    }
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    metrics: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    order = list(trainers)
    for repeat in range(args.warmup + args.steps):
        shift = repeat % len(order)
        for variant in order[shift:] + order[:shift]:
            trainer = trainers[variant]
            start = time.perf_counter()
            row = trainer.train_step()
            synchronize(parallel.device)
            if repeat >= args.warmup:
                times[variant].append(time.perf_counter() - start)
                metrics[variant].append(row)
    counts = trainers["device"].counts
    result = {
        "model": model,
        "total_params": counts.total_params,
        "active_params": counts.active_params,
        "cache_rows": args.cache_rows,
        "tokens_per_step": trainers["device"].config.train.global_batch_size
        * trainers["device"].config.model.seq_length,
        "variants": {},
    }
    for variant in VARIANTS:
        mean = {
            tag: statistics.fmean(r.get(tag, 0.0) for r in metrics[variant])
            for tag in (
                "stem/prefetch_stall_ms",
                "stem/bytes_h2d",
                "stem/cache_hit_rate",
                "stem/sparse_optim_ms",
                "stem/overlapped_tables",
            )
        }
        result["variants"][variant] = {
            "step_ms": 1e3 * statistics.median(times[variant]),
            "prefetch_stall_ms": mean["stem/prefetch_stall_ms"],
            "bytes_h2d": mean["stem/bytes_h2d"],
            "cache_hit_rate": mean["stem/cache_hit_rate"],
            "sparse_optim_ms": mean["stem/sparse_optim_ms"],
            "overlapped_tables": mean["stem/overlapped_tables"],
        }
    device_ms = result["variants"]["device"]["step_ms"]
    result["host_vs_device"] = result["variants"]["host"]["step_ms"] / device_ms
    result["host_cache_vs_device"] = result["variants"]["host_cache"]["step_ms"] / device_ms
    noclip_ms = result["variants"]["device_noclip"]["step_ms"]
    result["host_noclip_vs_device_noclip"] = (
        result["variants"]["host_noclip"]["step_ms"] / noclip_ms
    )
    result["host_overlap_vs_device_noclip"] = (
        result["variants"]["host_overlap"]["step_ms"] / noclip_ms
    )
    del trainers
    return result


def print_table(results: list[dict]) -> None:
    print(
        "| model | params | variant | step ms | x device | stall ms | MB h2d/step | cache hits "
        "| table update ms | tables overlapped |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for variant, v in r["variants"].items():
            # The no-clip variants compare with the device run without clipping.
            base = r["variants"][
                "device_noclip" if "noclip" in variant or "overlap" in variant else "device"
            ]["step_ms"]
            print(
                f"| {r['model']} | {r['total_params'] / 1e6:.1f}M | {variant} | "
                f"{v['step_ms']:.0f} | {v['step_ms'] / base:.3f} | "
                f"{v['prefetch_stall_ms']:.2f} | {v['bytes_h2d'] / 1e6:.2f} | "
                f"{v['cache_hit_rate']:.1%} | {v['sparse_optim_ms']:.1f} | "
                f"{v['overlapped_tables']:.0f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "100m"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cache-rows", type=int, default=1024)
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="extra section.key=value overrides for every model (smoke test)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/host_tables.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"load average (1 min) before: {load:.2f}; {args.threads} threads")
    parallel = ParallelState.initialize()
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for model in args.models:
                results.append(bench_model(model, args, Path(tmp), parallel))
                r = results[-1]
                print(
                    f"{model}: {r['total_params']:,} parameters "
                    f"({r['active_params']:,} active per token), {r['tokens_per_step']} "
                    f"tokens per step: host {r['host_vs_device']:.3f}x device, host + cache "
                    f"{r['host_cache_vs_device']:.3f}x; without clipping: host "
                    f"{r['host_noclip_vs_device_noclip']:.3f}x, host with the overlapped "
                    f"update {r['host_overlap_vs_device_noclip']:.3f}x",
                    flush=True,
                )
    finally:
        parallel.destroy()
    print_table(results)
    out = {
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
    }
    print(f"load average (1 min) after: {out['load_after']:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
