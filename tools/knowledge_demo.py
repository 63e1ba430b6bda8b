#!/usr/bin/env python
"""Measured knowledge-editing demo: teach the tiny STEM model country capitals, swap rows.

    python tools/knowledge_demo.py [--out runs/knowledge_demo-<time>] [--steps 800] [--pairs 20] \
        [--stem-layers 0,1,2,3] [--seed 1234] [--from-run <earlier out>/run]

1. Fact sentences from countryinfo's country -> capital table (4 templates), mixed with
   works of the bundled Shakespeare corpus; a byte-level BPE trained on the mix (common
   country names become single tokens); indexed train/val datasets.
2. A small STEM model (configs/tiny.yaml made smaller: 4 layers, hidden 128, STEM in every
   layer) trained on CPU.
3. Probe "The capital of <country> is" greedily: the facts it learned.
4. Swap the STEM rows of pairs of learned countries (single-token names, strict rule; and
   multi-token names with the repeat rule) in all STEM layers, in the lower and upper half,
   and on the fly (--stem-remap semantics, no weight change). Report edit success (probes of
   swapped countries now answer the partner's capital) and locality (probes of every other
   country answer as before). Prints a table; writes <out>/knowledge_demo.json.
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

# Only light imports here; the functions import what loads torch, so that --help and a bad
# flag answer before it.
from stem_megatron.cli.args import HelpFormatter, int_list, non_negative_int, positive_int
from stem_megatron.cli.preprocess_data import preprocess
from stem_megatron.config_loader import load_config
from stem_megatron.data.tokenizer import train_bpe_tokenizer
from stem_megatron.editing.remap import parse_remap
from stem_megatron.editing.spec import EditSpec

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its corpus and configs
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

if TYPE_CHECKING:
    from stem_megatron.editing.facts import Fact

CORPUS = ROOT / "data/corpus/shakespeare.jsonl.xz"
# configs/tiny.yaml made smaller (fits a shared 2-core CPU in minutes): 4 layers, hidden 128.
# Memorising facts wants many small steps; the tables get 10x the backbone's LR (the paper
# also trains tables with a higher LR).
MODEL = [
    "model.num_layers=4",
    "model.hidden_size=128",
    "model.ffn_hidden_size=512",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "train.micro_batch_size=16",
    "train.global_batch_size=16",
    "stem.optimizer.lr=1e-2",
]


def build_data(out: Path, facts: list[Fact], args) -> dict[str, Path]:
    """The mixed corpus, its tokenizer and the indexed datasets."""
    from stem_megatron.editing.facts import fact_documents

    docs = fact_documents(facts, args.repeats, per_document=12, seed=args.seed)
    n_fact_docs = len(docs)
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        works = [json.loads(line)["text"] for line, _ in zip(f, range(args.works))]
    docs += [w[i : i + 4000] for w in works for i in range(0, len(w), 4000)]
    random.Random(args.seed).shuffle(docs)
    out.mkdir(parents=True)
    corpus = out / "mix.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = out / "tokenizer.json"
    train_bpe_tokenizer(docs, args.vocab, tokenizer)
    result = preprocess([corpus], tokenizer, out / "mix", val_fraction=0.05, seed=args.seed)
    print(
        f"data: {len(facts)} facts in {n_fact_docs} documents + {args.works} works "
        f"({len(docs) - n_fact_docs} documents); {result['tokens']} tokens"
    )
    return {"tokenizer": tokenizer, "train": out / "mix_train", "val": out / "mix_val"}


def train(out: Path, data: dict[str, Path], args) -> Path:
    overrides = [
        f"data.tokenizer={data['tokenizer']}",
        f"data.train_data={data['train']}",
        f"data.valid_data={data['val']}",
        f"stem.layers={args.stem_layers}",
        f"model.seq_length={args.seq_length}",
        f"train.train_iters={args.steps}",
        f"optim.lr_warmup_iters={max(1, args.steps // 20)}",
        "train.eval_interval=0",
        "train.eval_iters=1",
        "checkpoint.save_interval=0",
        *MODEL,
        f"logging.log_interval={max(1, args.steps // 10)}",
        f"logging.run_dir={out / 'run'}",
        f"train.seed={args.seed}",
        *args.override,
    ]
    from stem_megatron.parallel.state import ParallelState
    from stem_megatron.training.trainer import Trainer

    config = load_config(ROOT / "configs/tiny.yaml", overrides)
    parallel = ParallelState.initialize()
    try:
        result = Trainer(config, parallel).run()
    finally:
        parallel.destroy()
    if result.stopped_by:  # e.g. SIGTERM: the trainer saved and stopped early
        raise SystemExit(
            f"training stopped by {result.stopped_by} at step {result.step}; the "
            f"checkpoint is in {out / 'run'}"
        )
    print(f"trained {result.step} steps: {result}")
    return out / "run"


def pairs_of(countries: list[str], n: int, tok, rng: random.Random) -> list[tuple[str, str]]:
    """Up to n random pairs of countries whose names share no token: a row edited for one
    pair must not be edited again by another."""
    chosen, used = [], set()
    for country in rng.sample(countries, len(countries)):
        ids = set(tok.encode(" " + country))
        if not ids & used and len(chosen) < 2 * n:
            chosen.append(country)
            used |= ids
    chosen = chosen[: len(chosen) // 2 * 2]
    return list(zip(chosen[0::2], chosen[1::2]))


def score(
    after: dict, before: dict, facts: dict[str, Fact], tokenizer, pairs: list[tuple[str, str]]
) -> dict:
    """Edit success over both directions of each pair (and how many edited probes still give
    their own capital); locality over every other country."""
    from stem_megatron.editing.facts import capital_ids

    partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    flipped = [
        after[c][: len(t)] == t
        for c in partner
        for t in [capital_ids(tokenizer, facts[partner[c]])]
    ]
    own = [after[c][: len(t)] == t for c in partner for t in [capital_ids(tokenizer, facts[c])]]
    others = [c for c in facts if c not in partner]
    kept = [
        after[c][: len(capital_ids(tokenizer, facts[c]))]
        == before[c][: len(capital_ids(tokenizer, facts[c]))]
        for c in others
    ]
    return {
        "edit_success": sum(flipped) / max(1, len(flipped)),
        "edited_probes": len(flipped),
        "still_own_capital": sum(own) / max(1, len(own)),
        "locality": sum(kept) / max(1, len(kept)),
        "unrelated_probes": len(kept),
    }


def measure(run_dir: Path, facts: list[Fact], args) -> dict:
    """Probe the trained model, then every edit setup; the report's figures."""
    from stem_megatron.checkpoint.inference import load_for_inference
    from stem_megatron.editing.edit import edit_model, plan_edits
    from stem_megatron.editing.facts import answers, capital_ids
    from stem_megatron.parallel.state import ParallelState

    parallel = ParallelState.initialize()
    try:
        loaded = load_for_inference(str(run_dir))
        model, tok = loaded.model, loaded.tokenizer
        by_country = {f.country: f for f in facts}
        before = answers(model, tok, facts)
        learned = [
            f.country
            for f in facts
            if before[f.country][: len(capital_ids(tok, f))] == capital_ids(tok, f)
        ]
        pool = learned if args.pairs_from == "learned" else list(by_country)
        single = [c for c in pool if len(tok.encode(" " + c)) == 1]
        multi = [c for c in pool if len(tok.encode(" " + c)) > 1]
        rng = random.Random(args.seed)
        setups = [
            ("single-token names, strict", pairs_of(single, args.pairs, tok, rng), "strict"),
            ("multi-token names, repeat", pairs_of(multi, args.pairs, tok, rng), "repeat"),
        ]
        stem_layers = sorted(loaded.config.stem_layers())
        half = len(stem_layers) // 2
        layer_sets = [
            ("all STEM layers", stem_layers),
            ("lower half", stem_layers[:half]),
            ("upper half", stem_layers[half:]),
        ]
        originals = {n: t.weight.detach().clone() for n, t in model.stem_tables().items()}
        rows = []
        for label, pairs, rule in setups:
            if not pairs:
                continue
            plans = plan_edits(tok, [EditSpec("swap", pair) for pair in pairs], rule)
            for where, layers in layer_sets:
                edit_model(model, plans, layers)
                rows.append(
                    {
                        "entities": label,
                        "layers": where,
                        "stem_layers": layers,
                        "pairs": len(pairs),
                        **score(answers(model, tok, facts), before, by_country, tok, pairs),
                    }
                )
                for name, table in model.stem_tables().items():
                    table.weight.data.copy_(originals[name])
            remap = parse_remap(
                tok, [f"{a}={b}" for a, b in pairs] + [f"{b}={a}" for a, b in pairs], rule
            )
            rows.append(
                {
                    "entities": label,
                    "layers": "on the fly (--stem-remap)",
                    "stem_layers": stem_layers,
                    "pairs": len(pairs),
                    **score(
                        answers(model, tok, facts, stem_ids=remap), before, by_country, tok, pairs
                    ),
                }
            )
    finally:
        parallel.destroy()
    return {
        "facts": len(facts),
        "learned": len(learned),
        "learned_fraction": len(learned) / len(facts),
        "pairs_from": args.pairs_from,
        "single_token": len(single),
        "multi_token": len(multi),
        "run_dir": str(run_dir),
        "results": rows,
    }


def run_demo(args) -> dict:
    from stem_megatron.editing.facts import country_capitals

    out = Path(args.out)
    t0 = time.perf_counter()
    facts = country_capitals()[: args.countries or None]
    if args.from_run:
        out.mkdir(parents=True)
        run_dir, t_train = Path(args.from_run), None
    else:
        run_dir = train(out, build_data(out / "data", facts, args), args)
        t_train = round(time.perf_counter() - t0, 1)
    report = {
        **measure(run_dir, facts, args),
        "train_steps": args.steps,
        "train_seconds": t_train,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "knowledge_demo.json").write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(
        f"\nfacts learned: {report['learned']}/{report['facts']} "
        f"({100 * report['learned_fraction']:.1f}%); pairs from {report['pairs_from']} facts: "
        f"{report['single_token']} single-token names, {report['multi_token']} multi-token; "
        f"training {report['train_seconds']} s, total {report['total_seconds']} s"
    )
    print(
        f"{'swapped pairs':<30} {'where':<28} {'pairs':>5} {'edit success':>13} {'locality':>9} "
        f"{'own capital':>12}"
    )
    for r in report["results"]:
        print(
            f"{r['entities']:<30} {r['layers']:<28} {r['pairs']:>5} "
            f"{100 * r['edit_success']:>12.1f}% {100 * r['locality']:>8.1f}% "
            f"{100 * r['still_own_capital']:>11.1f}%"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    ap.add_argument(
        "--out",
        default=f"runs/knowledge_demo-{time.strftime('%Y%m%d-%H%M%S')}",
        help="new directory for the data, the run and knowledge_demo.json",
    )
    ap.add_argument("--steps", type=positive_int, default=800, help="training steps")
    ap.add_argument("--countries", type=non_negative_int, default=0, help="first N facts (0: all)")
    ap.add_argument(
        "--repeats", type=positive_int, default=16, help="copies of each fact per template"
    )
    ap.add_argument(
        "--works", type=non_negative_int, default=1, help="Shakespeare works in the mix"
    )
    ap.add_argument("--vocab", type=positive_int, default=4096, help="BPE vocabulary size")
    ap.add_argument("--seq-length", type=positive_int, default=64, help="model.seq_length")
    ap.add_argument(
        "--pairs", type=positive_int, default=20, help="country pairs swapped per setup"
    )
    ap.add_argument(
        "--pairs-from",
        choices=("learned", "all"),
        default="learned",
        help="countries to pair: those whose fact the model learned, or all (smoke tests)",
    )
    ap.add_argument(
        "--from-run",
        help="measure an earlier demo's trained run dir (<out>/run) "
        "instead of building data and training",
    )
    ap.add_argument(
        "--stem-layers",
        type=int_list,
        default=[0, 1, 2, 3],
        help="STEM layers of the 4-layer model, e.g. 1,3 (default: all)",
    )
    ap.add_argument("--seed", type=non_negative_int, default=1234, help="data, split and run seed")
    ap.add_argument("--override", nargs="*", default=[], help="extra config overrides key=value")
    args = ap.parse_args(argv)
    if Path(args.out).exists():
        print(f"error: output {args.out} already exists; choose a new --out", file=sys.stderr)
        return 1
    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
