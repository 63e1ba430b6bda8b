#!/usr/bin/env python
"""Generate text from a training checkpoint on CPU.

    python tools/generate.py --checkpoint runs/tiny/checkpoints/latest --prompt "ROMEO." \
        [--max-new-tokens 100] [--temperature 0.8] [--top-k 40] [--seed 0] \
        [--stem-remap "Spain=Germany" ...]

`--checkpoint` takes a step dir, a checkpoints dir or a run dir (follows `latest`).
Temperature 0 (the default) is greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python tools/x.py` without installing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate text from a stem_megatron checkpoint.")
    ap.add_argument("--checkpoint", required=True, help="step dir, checkpoints dir or run dir")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="tokenizer path (default: the one in the run's config)")
    ap.add_argument("--stem-remap", action="append", default=[], metavar="FROM=TO",
                    help="knowledge editing on the fly: the text is unchanged, but the tokens of "
                         "FROM index the STEM tables as the tokens of TO (repeatable)")
    ap.add_argument("--stem-remap-rule", choices=("strict", "repeat", "pick"), default="strict",
                    help="FROM and TO of different token lengths (docs/knowledge_editing.md)")
    ap.add_argument("--stem-remap-pick", type=int, default=-1, help="TO token the pick rule takes")
    ap.add_argument("--stem-remap-forms", choices=("inner", "both"), default="inner",
                    help="match entities inside sentences (inner) or also at the prompt's start")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

    from stem_megatron.checkpoint.errors import CheckpointNotFoundError, CheckpointMismatchError
    from stem_megatron.checkpoint.inference import load_for_inference
    from stem_megatron.editing.remap import parse_remap
    from stem_megatron.generation import generate_text
    from stem_megatron.parallel.state import ParallelState

    parallel = ParallelState.initialize()
    try:
        loaded = load_for_inference(args.checkpoint, args.tokenizer)
        remap = None
        if args.stem_remap:
            if not loaded.model.stem_tables():
                raise ValueError("--stem-remap redirects STEM table lookups, but this checkpoint "
                                 "is a dense model (no STEM layers)")
            remap = parse_remap(loaded.tokenizer, args.stem_remap, args.stem_remap_rule,
                                args.stem_remap_pick, args.stem_remap_forms)
        text = generate_text(loaded.model, loaded.tokenizer, args.prompt,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed, stem_ids=remap)
    except (CheckpointNotFoundError, CheckpointMismatchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        parallel.destroy()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
