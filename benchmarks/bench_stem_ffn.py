"""Forward + backward of one FFN: STEM vs dense SwiGLU vs an embedding lookup with a dense
table gradient (the official STEM code's path), at equal hidden size and d_ff.

- dense: our SwiGLUMLP (megatron-core linears, fused [gate; up] fc1).
- stem: our StemMLP (gate linear, table lookup with a row-sparse gradient, down linear).
- stem_dense_grad: the same FFN with F.embedding for the lookup, so the table gets a dense
  [vocab, d_ff] gradient every backward (set to None between steps, as zero_grad does).
STEM has two of the three matmuls, so its FLOPs are 2/3 of dense; the lookup is extra.
Tokens are drawn Zipfian (p ~ 1/rank^1.1), like real text. Reported: median time of
--repeats forward+backward passes after --warmup (the three take turns), and the ratios.

    .venv/bin/python benchmarks/bench_stem_ffn.py [--shapes 4096,512,1536,32000 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
from megatron.core import ModelParallelConfig

from stem_megatron.model.stem_ffn import StemMLP, SwiGLUMLP
from stem_megatron.parallel.state import ParallelState
from stem_megatron.stem.table import xavier_normal_std

SEQ_PER_SAMPLE = 1024
ZIPF_EXPONENT = 1.1
DEFAULT_SHAPES = ["4096,512,1536,32000", "4096,768,2048,50304"]


class EmbeddingDenseGradMLP(torch.nn.Module):
    """StemMLP's computation with F.embedding for the lookup: a dense table gradient."""

    def __init__(self, stem: StemMLP) -> None:
        super().__init__()
        self.stem = stem

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        gate = self.stem.linear_fc1(x)[0]
        rows = F.embedding(token_ids, self.stem.stem_table.weight)
        return self.stem.linear_fc2(F.silu(gate) * rows)[0]


def median_ms(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median time of each step, the steps taking turns within each repeat so that a load
    change on the shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def fwd_bwd(
    module: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor, upstream: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        for p in module.parameters():
            p.grad = None
        x.grad = None
        module(x, ids).backward(upstream)
        for m in module.modules():
            if hasattr(m, "grad_accumulator"):
                m.grad_accumulator.clear()

    return step


def bench_shape(tokens: int, hidden: int, ffn: int, vocab: int, args: argparse.Namespace) -> dict:
    config = ModelParallelConfig(
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )
    dense = SwiGLUMLP(hidden, ffn, config)
    stem = StemMLP(hidden, ffn, vocab, config, tp_size=1)
    with torch.no_grad():
        for p in [*dense.parameters(), *stem.parameters()]:
            p.normal_(0, 0.02)
        stem.stem_table.weight.normal_(0, xavier_normal_std(vocab, ffn))
    gen = torch.Generator().manual_seed(0)
    seq = min(tokens, SEQ_PER_SAMPLE)
    shape = (seq, tokens // seq)  # megatron layout [s, b]
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** ZIPF_EXPONENT
    ids = torch.multinomial(probs, tokens, replacement=True, generator=gen).view(shape)
    x = torch.randn(*shape, hidden, generator=gen).requires_grad_()
    upstream = torch.randn(*shape, hidden, generator=gen)
    ms = median_ms(
        {
            "dense": fwd_bwd(dense, x, ids, upstream),
            "stem": fwd_bwd(stem, x, ids, upstream),
            "stem_dense_grad": fwd_bwd(EmbeddingDenseGradMLP(stem), x, ids, upstream),
        },
        args.warmup,
        args.repeats,
    )
    return {
        "tokens": tokens,
        "hidden": hidden,
        "ffn_hidden": ffn,
        "vocab": vocab,
        "unique_ids": int(ids.unique().numel()),
        "ms": ms,
        "stem_vs_dense": ms["stem"] / ms["dense"],
        "stem_dense_grad_vs_dense": ms["stem_dense_grad"] / ms["dense"],
        "stem_vs_stem_dense_grad": ms["stem"] / ms["stem_dense_grad"],
        "flops_ratio": 2 / 3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes", nargs="+", default=DEFAULT_SHAPES, help="tokens,hidden,ffn,vocab"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "stem_ffn.json"
    )
    args = parser.parse_args()

    load_before = os.getloadavg()
    parallel = ParallelState.initialize()
    try:
        results = [bench_shape(*map(int, s.split(",")), args) for s in args.shapes]
    finally:
        parallel.destroy()
    out = {
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")

    print(
        f"\n{out['threads']} threads, "
        f"load avg {load_before[0]:.2f} -> {out['load_avg_after'][0]:.2f}"
    )
    print(
        "\n| tokens | d | d_ff | V | unique ids | dense ms | STEM ms | emb+dense grad ms "
        "| STEM/dense | emb/dense | STEM/emb |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["ms"]
        print(
            f"| {r['tokens']} | {r['hidden']} | {r['ffn_hidden']} | {r['vocab']} "
            f"| {r['unique_ids']} | {m['dense']:.1f} | {m['stem']:.1f} "
            f"| {m['stem_dense_grad']:.1f} | {r['stem_vs_dense']:.2f} "
            f"| {r['stem_dense_grad_vs_dense']:.2f} | {r['stem_vs_stem_dense_grad']:.2f} |"
        )


if __name__ == "__main__":
    main()
