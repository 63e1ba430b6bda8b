"""The host Adam kernel for dense optimizer offload: DeepSpeedCPUAdam vs torch's CPU AdamW.

`optim.optimizer_cpu_offload` keeps the fp32 main params and Adam moments in host memory and
steps them there (megatron-core's HybridDeviceOptimizer). Each step the host then
1. copies the device's bf16 gradient into the fp32 host gradient (the D2H copy, upcast),
2. runs the CPU Adam(W) step on the fp32 main params,
3. copies the fp32 main params back into the device's bf16 params (the H2D copy, rounded).
On a CPU-only machine the copies are memcpys; the step is the same work as on a GPU node.

Kernels, on the parameter shapes of a Llama-style decoder (per layer: qkv, proj, fc1 of a
gated FFN, fc2, two norm weights) with `layers` layers of width `hidden`:
- torch_fused: torch.optim.AdamW(fused=True) over all tensors (what HybridDeviceOptimizer
  builds by default: megatron-core passes fused=True to torch's AdamW);
- torch_fused_per_tensor: one fused AdamW per tensor (what HybridDeviceOptimizer builds with
  overlap_cpu_optimizer_d2h_h2d=True, so each tensor's copy-back can start early);
- torch_foreach: AdamW(foreach=True); torch_for_loop: AdamW(foreach=False);
- deepspeed: DeepSpeedCPUAdam(adamw_mode=True), if deepspeed imports and its op builds.
Every kernel starts from the same params and gradients and runs the same steps; the report
gives each one's step time, wall and CPU (the median over --rounds of each round's median),
its ratio to torch_fused, and the largest difference of its final params from torch_fused's
(all must compute the same AdamW).

    .venv/bin/python benchmarks/bench_dense_optimizer.py [--sizes 512:3 1024:8 --repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stem_megatron.atomic_file import write_text_atomically
from stem_megatron.timing import median_ms

HYPER = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
BASELINE = "torch_fused"
TIMES = ("step_ms", "step_cpu_ms", "offload_step_ms", "offload_step_cpu_ms")
MakeOptimizer = Callable[[list[torch.nn.Parameter]], list[torch.optim.Optimizer]]


def layer_shapes(hidden: int, layers: int) -> list[tuple[int, ...]]:
    """A decoder's dense parameter shapes: GQA with half the heads as KV groups, d_ff 3 x hidden."""
    ffn, kv = 3 * hidden, hidden // 2
    one = [
        (hidden + 2 * kv, hidden),
        (hidden, hidden),
        (2 * ffn, hidden),
        (hidden, ffn),
        (hidden,),
        (hidden,),
    ]
    return one * layers


def decoder_size(text: str) -> tuple[int, int]:
    """--sizes' HIDDEN:LAYERS."""
    try:
        hidden, layers = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HIDDEN:LAYERS, e.g. 512:3, got '{text}'"
        ) from None
    if hidden < 2 or hidden % 2 or layers < 1:
        raise argparse.ArgumentTypeError(f"HIDDEN must be even and >= 2, LAYERS >= 1, got '{text}'")
    return hidden, layers


def torch_kernels() -> dict[str, MakeOptimizer]:
    return {
        "torch_fused": lambda ps: [torch.optim.AdamW(ps, **HYPER, fused=True)],
        "torch_fused_per_tensor": lambda ps: [
            torch.optim.AdamW([p], **HYPER, fused=True) for p in ps
        ],
        "torch_foreach": lambda ps: [torch.optim.AdamW(ps, **HYPER, foreach=True)],
        "torch_for_loop": lambda ps: [torch.optim.AdamW(ps, **HYPER, foreach=False)],
    }


def deepspeed_kernel() -> tuple[MakeOptimizer | None, str, float | None]:
    """DeepSpeedCPUAdam's constructor, why it is missing otherwise, and the seconds its first
    load took (the JIT build of the cpu_adam op on a fresh cache, a load from the cache after)."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder

        start = time.perf_counter()
        CPUAdamBuilder().load()
        load_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - missing package or failed build: reported, not fatal
        return None, f"unavailable: {type(exc).__name__}: {str(exc)[:200]}", None
    return (lambda ps: [DeepSpeedCPUAdam(ps, **HYPER, adamw_mode=True)]), "ok", load_s


class OffloadStep:
    """One kernel's state: bf16 'device' params and grads, fp32 host main params and grads."""

    def __init__(self, make: MakeOptimizer, shapes: list[tuple[int, ...]], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.main = [torch.nn.Parameter(0.02 * torch.randn(s, generator=gen)) for s in shapes]
        for p in self.main:
            p.grad = torch.empty_like(p)
        self.device_params = [p.detach().to(torch.bfloat16) for p in self.main]
        self.device_grads = [
            (1e-3 * torch.randn(s, generator=gen)).to(torch.bfloat16) for s in shapes
        ]
        self.optimizers = make(self.main)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def offload_step(self) -> None:
        torch._foreach_copy_([p.grad for p in self.main], self.device_grads)
        self.step()
        torch._foreach_copy_(self.device_params, [p.detach() for p in self.main])


def measure(
    make: MakeOptimizer,
    shapes: list[tuple[int, ...]],
    args: argparse.Namespace,
    reference: list[torch.Tensor] | None,
) -> tuple[dict, list[torch.Tensor]]:
    state = OffloadStep(make, shapes, args.seed)
    state.offload_step()  # the moments exist before any timing
    row = {
        f"{name}_{unit}": median_ms(fn, args.warmup, args.repeats, clock)
        for name, fn in (("offload_step", state.offload_step), ("step", state.step))
        for unit, clock in (("ms", time.perf_counter), ("cpu_ms", time.process_time))
    }
    final = [p.detach() for p in state.main]
    if reference is not None:
        row["max_abs_diff_vs_torch_fused"] = max(
            (a - b).abs().max().item() for a, b in zip(final, reference)
        )
    return row, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=decoder_size,
        default=[(512, 3), (1024, 8)],
        help="HIDDEN:LAYERS of the decoder whose dense params are stepped "
        "(default: ~9.5M and ~96M params)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per kernel and round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="times each kernel is measured afresh"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and DeepSpeed's OpenMP loop (default: torch's); "
        "with 1, CPU time is each kernel's own work even on a loaded machine",
    )
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "dense_optimizer.json"
    )
    args = parser.parse_args()
    if args.threads:  # before DeepSpeed's op loads its OpenMP runtime, which reads the variable
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)

    kernels = torch_kernels()
    ds_make, ds_status, ds_load_s = (
        (None, "skipped (--no-deepspeed)", None) if args.no_deepspeed else deepspeed_kernel()
    )
    if ds_make is not None:
        kernels["deepspeed"] = ds_make
    load_before = os.getloadavg()
    results = []
    for hidden, layers in args.sizes:
        shapes = layer_shapes(hidden, layers)
        entry = {
            "hidden": hidden,
            "layers": layers,
            "tensors": len(shapes),
            "params": sum(torch.Size(s).numel() for s in shapes),
            "kernels": {},
        }
        # Rounds over all kernels, not all of one kernel's steps in a row: a load change on a
        # shared machine then lands on every kernel alike.
        rounds: dict[str, list[dict]] = {name: [] for name in kernels}
        reference = None
        for _ in range(args.rounds):
            for name, make in kernels.items():  # torch_fused first: it is the reference
                row, final = measure(make, shapes, args, None if name == BASELINE else reference)
                reference = final if name == BASELINE else reference
                rounds[name].append(row)
        for name, rows in rounds.items():
            entry["kernels"][name] = {
                key: statistics.median(r[key] for r in rows) for key in rows[0]
            }
        base = entry["kernels"][BASELINE]
        for row in entry["kernels"].values():
            for key in TIMES:
                row[f"{key}_vs_torch_fused"] = row[key] / base[key]
        results.append(entry)

    out = {
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "hyper": HYPER,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "deepspeed_status": ds_status,
        "deepspeed_op_load_s": ds_load_s,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.json, json.dumps(out, indent=2) + "\n")
    print_report(out)


def print_report(out: dict) -> None:
    print(
        f"\ndense AdamW step on host, {out['threads']} torch threads, torch {out['torch']}, "
        f"deepspeed: {out['deepspeed_status']}, load avg {out['load_avg_before'][0]:.2f} -> "
        f"{out['load_avg_after'][0]:.2f}"
    )
    print(
        "step = optimizer step on fp32 main params; offload step = bf16 grad -> fp32, step, "
        "fp32 -> bf16 params\n"
    )
    print(
        "| params | kernel | step ms (x fused) | step CPU ms (x fused) | offload step ms (x fused) "
        "| offload step CPU ms (x fused) | max abs diff vs fused |"
    )
    print("|---|---|---|---|---|---|---|")
    for entry in out["results"]:
        for name, row in entry["kernels"].items():
            diff = row.get("max_abs_diff_vs_torch_fused")
            times = [f"{row[key]:.1f} ({row[f'{key}_vs_torch_fused']:.2f}x)" for key in TIMES]
            print(
                f"| {entry['params'] / 1e6:.1f}M ({entry['tensors']} tensors) | {name} | "
                + " | ".join(times)
                + f" | {'-' if diff is None else f'{diff:.1e}'} |"
            )


if __name__ == "__main__":
    main()
