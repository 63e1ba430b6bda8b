"""Describe a checkpoint: step, layout, tensors, and per-layer statistics of its STEM tables.

    stem-inspect runs/tiny [--tensors] [--pairs 20000] [--seed 0] \
        [--dense-checkpoint runs/tiny_dense [--data data/prepared/shakespeare_val] \
         [--tokens 8192]] [--plot spread.png] [--json stats.json]

Per STEM layer: rows, rows updated (non-zero table-optimizer second moment), row norms, and
the angular spread (cosine similarity of random pairs) of the updated rows. With
`--dense-checkpoint`, the spread of the dense model's up-projection outputs W_up x on real
tokens (the first --tokens of --data, default the dense run's validation set) in the same
layers, next to the spread of the STEM rows those tokens select. A dense checkpoint given as
the first argument with --data reports its own up-projection spread in every layer.
`--plot` writes the cosine distributions as a PNG. See docs/checkpoint_tools.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from stem_megatron.cli.args import HelpFormatter, non_negative_int, positive_int

if TYPE_CHECKING:  # imported in main, after the arguments are checked: they load torch
    from stem_megatron.checkpoint.offline import OfflineCheckpoint
    from stem_megatron.checkpoint.table_stats import Spread

BINS = [-1 + 2 * i / 80 for i in range(81)]  # cosine histogram bins over [-1, 1]
STORAGE = {
    "device": "tables and their optimizer state in device memory",
    "host": "tables and their optimizer state in host memory, rows staged per step",
    "mmap": "tables and their optimizer state in memory-mapped files, rows staged per step",
}


def describe(ckpt: OfflineCheckpoint) -> dict:
    """Step, layout and tensor inventory, from metadata.json and DCP metadata only."""
    c = ckpt.config_dict
    p, s, m = c["parallel"], c["stem"], c["model"]
    kinds: dict[str, dict[str, int]] = {}
    for info in ckpt.infos().values():
        entry = kinds.setdefault(info.kind, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += info.nbytes
    layers = (
        (s["layers"] if s["layers"] is not None else list(range(1, m["num_layers"], 2)))
        if s["enabled"]
        else []
    )
    return {
        "path": str(ckpt.path),
        "step": ckpt.step,
        "data": ckpt.metadata.get("data"),
        "layout": {
            "tensor_model_parallel_size": p["tensor_model_parallel_size"],
            "pipeline_model_parallel_size": p["pipeline_model_parallel_size"],
            "virtual_pipeline_model_parallel_size": p["virtual_pipeline_model_parallel_size"],
            "stem.dp_layout": s["dp_layout"],
            "stem.storage": s["storage"],
            "stem.cache_rows": s["cache_rows"],
            "stem.optimizer.mode": s["optimizer"]["mode"],
        },
        "model": {
            k: m[k]
            for k in (
                "num_layers",
                "hidden_size",
                "ffn_hidden_size",
                "num_attention_heads",
                "num_query_groups",
                "seq_length",
            )
        },
        "stem_layers": sorted(layers),
        "kinds": kinds,
        "tensors": {
            k: {"shape": list(i.shape), "dtype": str(i.dtype).replace("torch.", ""), "kind": i.kind}
            for k, i in ckpt.infos().items()
        },
    }


def _spread_text(spread: Spread | None) -> str:
    if spread is None:
        return "-"
    s = spread.summary()
    if not s["pairs"]:
        return "(no pairs)"
    return (
        f"mean {s['mean']:+.3f} std {s['std']:.3f} |cos| {s['mean_abs']:.3f} "
        f"p5/p50/p95 {s['p5']:+.2f}/{s['p50']:+.2f}/{s['p95']:+.2f}"
    )


def print_report(info: dict, tables: list, dense: dict[int, Spread], show_tensors: bool) -> None:
    lay = info["layout"]
    print(f"checkpoint {info['path']}  step {info['step']}  data position {info['data']}")
    print(
        f"layout: TP {lay['tensor_model_parallel_size']} x PP "
        f"{lay['pipeline_model_parallel_size']} (virtual "
        f"{lay['virtual_pipeline_model_parallel_size'] or '-'}); STEM tables "
        f"{lay['stem.dp_layout']} over DP; storage tier {lay['stem.storage']} "
        f"({STORAGE.get(lay['stem.storage'], '?')}, cache_rows {lay['stem.cache_rows']}); "
        f"table optimizer {lay['stem.optimizer.mode']}"
    )
    print(
        "model: "
        + ", ".join(f"{k} {v}" for k, v in info["model"].items())
        + f"; STEM layers {info['stem_layers'] or 'none'}"
    )
    print(
        "on disk (full logical tensors, any layout loads them): "
        + "; ".join(
            f"{kind} {v['tensors']} tensors {v['bytes'] / 2**20:.2f} MiB"
            for kind, v in info["kinds"].items()
        )
    )
    if show_tensors:
        for key, t in info["tensors"].items():
            print(f"  {key:70s} {str(t['shape']):18s} {t['dtype']:9s} {t['kind']}")
    for t in tables:
        updated = (
            "unknown (no optimizer state)"
            if t.updated is None
            else f"{t.updated}/{t.rows} ({100 * t.updated / t.rows:.1f}%), "
            f"never updated {t.rows - t.updated}"
        )
        print(f"STEM layer {t.layer}: table [{t.rows}, {t.width}], rows updated {updated}")
        print(
            f"  row norms: all mean {t.norms['mean']:.4f} (min {t.norms['min']:.4f}, "
            f"max {t.norms['max']:.4f})"
            + (
                f"; updated mean {t.updated_norms['mean']:.4f}"
                if t.updated_norms and t.updated_norms["rows"]
                else ""
            )
        )
        print(
            f"  cosine, random pairs of {'updated ' if t.updated is not None else ''}rows: "
            f"{_spread_text(t.spread)}"
        )
        if t.token_spread is not None:
            print(f"  cosine, rows of random distinct data tokens: {_spread_text(t.token_spread)}")
        if t.layer in dense:
            print(
                f"  dense baseline W_up x, same layer, same tokens:  {_spread_text(dense[t.layer])}"
            )
    for layer in sorted(set(dense) - {t.layer for t in tables}):
        print(f"dense layer {layer}: W_up x on data tokens: {_spread_text(dense[layer])}")


def plot(path: Path, tables: list, dense: dict[int, Spread]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({t.layer for t in tables} | set(dense))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.5), squeeze=False)
    by_layer = {t.layer: t for t in tables}
    for ax, layer in zip(axes[0], layers):
        series = []
        if layer in by_layer:
            series.append(("STEM rows", by_layer[layer].spread))
            if by_layer[layer].token_spread is not None:
                series.append(("STEM rows of data tokens", by_layer[layer].token_spread))
        if layer in dense:
            series.append(("dense W_up x on data tokens", dense[layer]))
        for label, spread in series:
            ax.hist(spread.cosines.numpy(), bins=BINS, density=True, histtype="step", label=label)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("cosine similarity of random pairs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".tmp_{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.rename(path)


def _dense_spreads(args, main: OfflineCheckpoint, stem_layers: list[int]):
    """Up-projection spreads of the dense checkpoint (the main one if it has no STEM layers)
    per layer, and the data tokens they were measured on."""
    import torch.distributed as dist

    from stem_megatron.checkpoint.inference import load_for_inference
    from stem_megatron.checkpoint.table_stats import dense_token_spreads, validation_tokens
    from stem_megatron.parallel.state import ParallelState

    source = args.dense_checkpoint or main.path
    parallel = None if dist.is_initialized() else ParallelState.initialize()
    try:
        loaded = load_for_inference(str(source))
        layers = stem_layers or list(range(loaded.config.model.num_layers))
        prefix = args.data or loaded.config.data.valid_data
        if not prefix:
            raise ValueError(f"{source} has no validation data in its config: pass --data")
        vocab = loaded.config.model.vocab_size or loaded.tokenizer.vocab_size
        tokens = validation_tokens(prefix, vocab, args.tokens)
        return dense_token_spreads(
            loaded.model, layers, tokens, loaded.config.model.seq_length, args.pairs, args.seed
        ), tokens
    finally:
        if parallel is not None:
            parallel.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Describe a stem_megatron checkpoint.", formatter_class=HelpFormatter
    )
    ap.add_argument("checkpoint", help="step dir, checkpoints dir or run dir")
    ap.add_argument("--tensors", action="store_true", help="list every tensor")
    ap.add_argument("--pairs", type=positive_int, default=20000, help="random pairs per spread")
    ap.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random pairs")
    ap.add_argument("--dense-checkpoint", help="dense baseline run to compare with")
    ap.add_argument(
        "--data",
        help="indexed dataset prefix for the token-level spreads "
        "(default: the dense run's validation data)",
    )
    ap.add_argument("--tokens", type=positive_int, default=8192, help="data tokens to run")
    ap.add_argument("--plot", type=Path, help="write the cosine distributions as a PNG")
    ap.add_argument("--json", type=Path, help="write the report as JSON")
    args = ap.parse_args(argv)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        print(
            "error: --plot needs matplotlib: install the demo extra "
            "(pip install -e '.[demo]') or drop --plot",
            file=sys.stderr,
        )
        return 1
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

    from stem_megatron.checkpoint.errors import CheckpointNotFoundError, UnsafeCheckpointError
    from stem_megatron.checkpoint.offline import OfflineCheckpoint
    from stem_megatron.checkpoint.table_stats import stem_table_stats

    try:
        for path in (args.plot, args.json):
            if path is not None and path.exists():
                raise FileExistsError(f"output {path} already exists; choose a new path")
        ckpt = OfflineCheckpoint(args.checkpoint)
        info = describe(ckpt)
        dense, tokens = {}, None
        if args.dense_checkpoint or (not info["stem_layers"] and args.data):
            dense, tokens = _dense_spreads(args, ckpt, info["stem_layers"])
        tables = stem_table_stats(ckpt, args.pairs, args.seed, tokens)
    except (
        CheckpointNotFoundError,
        UnsafeCheckpointError,
        ValueError,
        KeyError,
        OSError,
    ) as exc:  # OSError: a missing tokenizer or dataset, an existing output
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_report(info, tables, dense, args.tensors)
    if args.json:
        report = {
            **info,
            "stem_tables": [
                {
                    "layer": t.layer,
                    "rows": t.rows,
                    "width": t.width,
                    "updated": t.updated,
                    "norms": t.norms,
                    "updated_norms": t.updated_norms,
                    "spread": t.spread.summary(),
                    "token_spread": t.token_spread.summary()
                    if t.token_spread is not None
                    else None,
                }
                for t in tables
            ],
            "dense_token_spread": {str(layer): s.summary() for layer, s in dense.items()},
        }
        tmp = args.json.with_name(f".tmp_{args.json.name}")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.rename(args.json)
    if args.plot:
        plot(args.plot, tables, dense)
        print(f"wrote {args.plot}")
    return 0
