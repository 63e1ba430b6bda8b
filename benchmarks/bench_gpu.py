"""The first figures from one GPU, in one command of under 5 minutes (issue 12):

  models       tokens/s and MFU of a training step (bf16) of our dense and STEM models at a
               ~100M and a ~1B-active shape, and of megatron-core's own GPTModel (local spec,
               forward + backward + fused AdamW) at the same shape, in the same run;
  table_update SparseRowAdamW updating 5% of a table's rows on the GPU against torch's fused
               AdamW over the whole table (bench_table_update.py's row draw);
  host_tier    step time of host tables (pinned, prefetched over real PCIe) and with the
               hot-row cache against device tables, with prefetch stall and bytes copied
               (bench_host_tables.py's variants, on its 100m model).

Needs the prepared corpus (`make data`). MFU is model FLOPs (planning/accounting.py: 6 x matmul
params + attention, per token) x tokens/s over the GPU's dense bf16 peak (--peak-tflops, else
known for H100/H200/A100 by name). Without CUDA it prints one line and writes nothing.

    .venv/bin/python benchmarks/bench_gpu.py [--json PATH] [--shapes 100m 1b] [--steps N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
import bench_host_tables  # noqa: E402 - siblings: this script's folder is first on sys.path
import bench_table_update  # noqa: E402

from stem_megatron.config_loader import load_config  # noqa: E402
from stem_megatron.parallel.state import ParallelState  # noqa: E402
from stem_megatron.stem.sparse_adam import SparseRowAdamW  # noqa: E402
from stem_megatron.timing import median_ms  # noqa: E402
from stem_megatron.training.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device: nothing measured"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "gpu.json"
# Dense bf16 peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
SHAPES = {
    # ~85M in the layers: 12 x 768, d_ff 3072; 8 sequences of 1024 tokens a step.
    "100m": [
        "model.num_layers=12",
        "model.hidden_size=768",
        "model.ffn_hidden_size=3072",
        "model.num_attention_heads=12",
        "model.num_query_groups=4",
        "model.seq_length=1024",
        "stem.layers=[1,3,5,7,9,11]",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
    ],
    # ~1B active: 16 x 2048, d_ff 8192; 8 sequences of 2048 tokens a step.
    "1b": [
        "model.num_layers=16",
        "model.hidden_size=2048",
        "model.ffn_hidden_size=8192",
        "model.num_attention_heads=16",
        "model.num_query_groups=8",
        "model.seq_length=2048",
        "stem.layers=[1,3,5,7,9,11,13,15]",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
    ],
}
KINDS = {"dense": ["stem.enabled=false"], "stem": []}


def synchronized(step):
    def run() -> None:
        step()
        torch.cuda.synchronize()

    return run


def trainer_for(overrides: list[str], run_dir: Path, parallel: ParallelState) -> Trainer:
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [*overrides, "train.bf16=true", "train.eval_interval=0", f"logging.run_dir={run_dir}"],
    )
    return Trainer(config, parallel)


def megatron_gpt_step(trainer: Trainer):
    """One training step of megatron-core's GPTModel at the trainer's shape and batch: its
    local spec with RMSNorm, SwiGLU and RoPE as ours, bf16, fused AdamW on its parameters."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    from stem_megatron.model.transformer import ModelSpec, megatron_config

    m, t = trainer.config.model, trainer.config.train
    spec = ModelSpec(model=m, vocab_size=trainer.vocab_size, stem_layers=(), bf16=True)
    config = dataclasses.replace(
        megatron_config(spec),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        use_cpu_initialization=False,
        perform_initialization=True,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(trainer.config.train.seed)  # its init's RNG
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=m.seq_length,
        position_embedding_type="rope",
        rotary_base=int(m.rope_theta),
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
    ).cuda()
    model = Float16Module(config, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    shape = (t.micro_batch_size, m.seq_length)
    tokens = torch.randint(0, trainer.vocab_size, shape, device="cuda")
    positions = torch.arange(m.seq_length, device="cuda").expand(shape)
    causal = torch.ones(m.seq_length, m.seq_length, device="cuda").triu(1).bool()[None, None]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(t.global_batch_size // t.micro_batch_size):
            model(tokens, positions, causal, labels=tokens).float().mean().backward()
        optimizer.step()

    return step


def measure(trainer: Trainer, step, args: argparse.Namespace) -> dict:
    """Median step time of `step` at `trainer`'s batch, as tokens/s and MFU (the trainer's
    model FLOPs per token), and the GPU's peak memory since the last measurement."""
    ms = median_ms(synchronized(step), args.warmup, args.steps)
    c = trainer.config
    tokens_per_s = c.train.global_batch_size * c.model.seq_length / (ms / 1e3)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    row = {
        "step_ms": ms,
        "tokens_per_s": tokens_per_s,
        "mfu": trainer.counts.flops_per_token * tokens_per_s / peak if peak else None,
        "active_params": trainer.counts.active_params,
        "total_params": trainer.counts.total_params,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    torch.cuda.reset_peak_memory_stats()
    return row


def bench_shape(shape: str, args: argparse.Namespace, parallel: ParallelState, tmp: Path) -> dict:
    out: dict = {}
    for kind, extra in KINDS.items():
        trainer = trainer_for(SHAPES[shape] + extra, tmp / shape / kind, parallel)
        out[kind] = measure(trainer, trainer.train_step, args)
        if kind == "dense":  # megatron-core's model at the same shape, counted as ours
            step = megatron_gpt_step(trainer)
            out["megatron_gpt"] = measure(trainer, step, args)
            del step
        del trainer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out["stem_vs_dense_tokens_per_s"] = out["stem"]["tokens_per_s"] / out["dense"]["tokens_per_s"]
    out["dense_vs_megatron_gpt_tokens_per_s"] = (
        out["dense"]["tokens_per_s"] / out["megatron_gpt"]["tokens_per_s"]
    )
    return out


def time_row_update(
    mode: str, id_sets: list[torch.Tensor], grad: torch.Tensor, args: argparse.Namespace
) -> tuple[float, str]:
    """Median ms of a SparseRowAdamW step over the next row set, and the kernel it chose."""
    table = torch.nn.Parameter(torch.randn(args.table_rows, args.table_dim, device="cuda") * 0.02)
    opt = SparseRowAdamW({"u": table}, lr=1e-3, weight_decay=0.1, mode=mode)
    stream = iter(id_sets)
    ms = median_ms(
        synchronized(lambda: opt.step({"u": (next(stream), grad)})), args.warmup, args.steps
    )
    return ms, opt.kernel


def bench_table_update_gpu(args: argparse.Namespace) -> dict:
    """SparseRowAdamW (lazy and exact) on a CUDA table, 5% of its rows touched per step, against
    torch.optim.AdamW(fused=True) over the whole table."""
    rows, dim, touched = args.table_rows, args.table_dim, int(args.table_rows * 0.05)
    steps = args.warmup + args.steps + 1
    id_sets = bench_table_update.draw_rows(
        rows, touched, "zipf", steps, torch.Generator().manual_seed(0)
    )
    id_sets = [ids.cuda() for ids in id_sets]
    grad = torch.randn(touched, dim, device="cuda") * 1e-3
    out = {"rows": rows, "dim": dim, "touched_rows": touched, "ms": {}}
    table = torch.nn.Parameter(torch.randn(rows, dim, device="cuda") * 0.02)
    table.grad = torch.randn(rows, dim, device="cuda") * 1e-3
    fused = torch.optim.AdamW([table], lr=1e-3, weight_decay=0.1, fused=True)
    out["ms"]["fused_adamw_whole_table"] = median_ms(
        synchronized(fused.step), args.warmup, args.steps
    )
    del fused, table
    for mode in ("lazy", "exact"):
        out["ms"][mode], out["kernel"] = time_row_update(mode, id_sets, grad, args)
    base = out["ms"]["fused_adamw_whole_table"]
    out["speedup_vs_fused"] = {m: base / out["ms"][m] for m in ("lazy", "exact")}
    return out


def bench_host_tier(args: argparse.Namespace, parallel: ParallelState, tmp: Path) -> dict:
    """bench_host_tables.py's variants on its 100m model, on this GPU (fp32)."""
    # GPU-sized steps: 4 micro-batches of 4 x 1024 tokens, so staging overlaps compute.
    longer = ["model.seq_length=1024", "train.micro_batch_size=4", "train.global_batch_size=16"]
    host_args = argparse.Namespace(
        cache_rows=args.cache_rows, override=longer, warmup=args.warmup, steps=args.steps
    )
    return bench_host_tables.bench_model("100m", host_args, tmp / "host_tier", parallel)


def print_report(out: dict) -> None:
    print(f"{out['device']} | torch {out['torch']} | peak {out['peak_tflops']} TFLOP/s bf16")
    print("| shape | model | step ms | tokens/s | MFU | active params | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for shape, kinds in out["models"].items():
        for kind in ("dense", "stem", "megatron_gpt"):
            r = kinds[kind]
            mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
            print(
                f"| {shape} | {kind} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} "
                f"| {r['active_params'] / 1e6:,.0f}M | {r['peak_memory_gib']:.1f} |"
            )
    t = out["table_update"]
    print(
        f"table update ({t['rows']:,} x {t['dim']}, {t['touched_rows']:,} rows, "
        f"kernel {t['kernel']}): " + ", ".join(f"{k} {v:.2f} ms" for k, v in t["ms"].items())
    )
    h = out["host_tier"]
    print("| tier | step ms | prefetch stall ms | bytes h2d | cache hit rate |")
    print("|---|---|---|---|---|")
    for name in ("device", "host", "host_cache"):
        v = h["variants"][name]
        print(
            f"| {name} | {v['step_ms']:.1f} | {v['prefetch_stall_ms']:.2f} "
            f"| {v['bytes_h2d']:,.0f} | {v['cache_hit_rate']:.2f} |"
        )
    print(f"host / device step time {h['host_vs_device']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--table-rows", type=int, default=262_144)
    parser.add_argument("--table-dim", type=int, default=2048)
    parser.add_argument("--cache-rows", type=int, default=1024)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    name = torch.cuda.get_device_name()
    if args.peak_tflops is None:
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    parallel = ParallelState.initialize()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
            out = {
                "device": name,
                "torch": torch.__version__,
                "peak_tflops": args.peak_tflops,
                "models": {s: bench_shape(s, args, parallel, Path(tmp)) for s in args.shapes},
                "table_update": bench_table_update_gpu(args),
                "host_tier": bench_host_tier(args, parallel, Path(tmp)),
            }
    finally:
        parallel.destroy()
    print_report(out)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
