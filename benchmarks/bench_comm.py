"""Bytes per training step of STEM vs the dense baseline under TP=2, and of the STEM table
sync under DP=2 vs what a dense table-gradient all-reduce would move (V x d_ff/TP x 4 bytes
per table). Real gloo processes on this machine; the counts come from the trainer's comm/*
metrics (stem_megatron/parallel/comm_meter.py), measured on the last of a few steps.

    python benchmarks/bench_comm.py [--steps 3] [--json benchmarks/results/comm.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stem_megatron.parallel.local_workers import run_local_workers  # noqa: E402
from stem_megatron.training.short_run import train_steps  # noqa: E402

# A small STEM model on the bundled corpus (vocab 8192): 4 layers, STEM in layers 1 and 3.
MODEL = ["model.num_layers=4", "model.hidden_size=128", "model.ffn_hidden_size=512",
         "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=128",
         "train.micro_batch_size=4", "train.global_batch_size=16", "train.train_iters=100",
         "stem.layers=[1,3]"]


def measure(world: int, overrides: list[str], steps: int) -> dict:
    result = run_local_workers(world, train_steps, MODEL + overrides, steps)[0]
    return {**result["comm"], "unique_rows": result["unique_rows"], **result["counts"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/comm.json"))
    ap.add_argument("--run-dir", default="/tmp/stem_bench_comm")
    args = ap.parse_args(argv)
    if not (ROOT / "data/prepared/shakespeare_train.bin").exists():
        print("error: run `python tools/prepare_corpus.py` (or `make data`) first", file=sys.stderr)
        return 1
    run = [f"logging.run_dir={args.run_dir}"]
    tp = ["parallel.tensor_model_parallel_size=2"]
    rows = {
        "tp2_stem": measure(2, run + tp, args.steps),
        "tp2_dense": measure(2, run + tp + ["stem.enabled=false"], args.steps),
        "dp2_replicated": measure(2, run + ["stem.dp_layout=replicated"], args.steps),
        "dp2_vocab_sharded": measure(2, run + ["stem.dp_layout=vocab_sharded"], args.steps),
    }
    tp_stem, tp_dense = rows["tp2_stem"]["comm/tp_bytes"], rows["tp2_dense"]["comm/tp_bytes"]
    print(f"TP=2, bytes per step on one rank (tensor-parallel collectives)")
    print(f"  STEM  {tp_stem:>14,.0f}")
    print(f"  dense {tp_dense:>14,.0f}")
    print(f"  STEM / dense = {tp_stem / tp_dense:.3f}  (STEM adds {tp_stem - tp_dense:,.0f} bytes)")
    summary = {"tp2_stem_over_dense": tp_stem / tp_dense}
    print("\nDP=2, STEM table sync bytes per step on one rank vs a dense table-gradient sync")
    print(f"  {'layout':<16}{'unique rows':>12}{'table sync':>14}{'dense sync':>14}{'ratio':>9}"
          f"{'dp-dense':>14}")
    for layout in ("dp2_replicated", "dp2_vocab_sharded"):
        r = rows[layout]
        dense_sync = 4 * r["table_params"]  # every table element, fp32, all-reduced
        if layout == "dp2_vocab_sharded":
            dense_sync *= 2  # DP=2: this rank holds half the rows; a dense sync moves all
        ratio = r["comm/dp_stem_bytes"] / dense_sync
        summary[f"{layout}_over_dense_table_sync"] = ratio
        print(f"  {layout:<16}{r['unique_rows']:>12,.0f}{r['comm/dp_stem_bytes']:>14,.0f}"
              f"{dense_sync:>14,.0f}{ratio:>9.4f}{r['comm/dp_dense_bytes']:>14,.0f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": MODEL, "steps": args.steps, "runs": rows,
                               "summary": summary}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
