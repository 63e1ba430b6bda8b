"""Generate text from a training checkpoint on CPU.

    stem-generate --checkpoint runs/latest --prompt "ROMEO." \
        [--max-new-tokens 100] [--temperature 0.8] [--top-k 40] [--seed 0] \
        [--stem-remap "Spain=Germany" ...]

`--checkpoint` takes a step dir, a checkpoints dir or a run dir (follows `latest`), or the
`latest` pointer file itself. `runs/latest` is the run `make train` made last.
Temperature 0 (the default) is greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from stem_megatron.cli.args import (
    HelpFormatter,
    non_negative_float,
    non_negative_int,
    positive_int,
)

REMAP_RULES = ("strict", "repeat", "pick")  # on the fly only id-to-id rules apply, no average


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Generate text from a stem_megatron checkpoint.", formatter_class=HelpFormatter
    )
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="step dir, checkpoints dir, run dir or latest pointer, e.g. runs/latest",
    )
    ap.add_argument(
        "--prompt",
        required=True,
        help="text to continue; the model sees at most model.seq_length tokens",
    )
    ap.add_argument(
        "--max-new-tokens", type=non_negative_int, default=100, help="tokens to generate"
    )
    ap.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="sampling temperature; 0: greedy",
    )
    ap.add_argument(
        "--top-k",
        type=positive_int,
        default=None,
        help="sample among the k likeliest tokens (default: all)",
    )
    ap.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    ap.add_argument("--tokenizer", help="tokenizer path (default: the one in the run's config)")
    ap.add_argument(
        "--stem-remap",
        action="append",
        default=[],
        metavar="FROM=TO",
        help="knowledge editing on the fly: the text is unchanged, but the tokens of "
        "FROM index the STEM tables as the tokens of TO (repeatable)",
    )
    ap.add_argument(
        "--stem-remap-rule",
        choices=REMAP_RULES,
        default="strict",
        help="FROM and TO of different token lengths (docs/knowledge_editing.md)",
    )
    ap.add_argument("--stem-remap-pick", type=int, default=-1, help="TO token the pick rule takes")
    ap.add_argument(
        "--stem-remap-forms",
        choices=("inner", "both"),
        default="inner",
        help="match entities inside sentences (inner) or also at the prompt's start",
    )
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

    from stem_megatron.checkpoint.errors import (
        CheckpointMismatchError,
        CheckpointNotFoundError,
        UnsafeCheckpointError,
    )
    from stem_megatron.checkpoint.inference import load_for_inference
    from stem_megatron.editing.entities import StrictLengthError
    from stem_megatron.editing.remap import parse_remap
    from stem_megatron.generation import generate_text
    from stem_megatron.parallel.state import ParallelState

    parallel = ParallelState.initialize()
    try:
        loaded = load_for_inference(args.checkpoint, args.tokenizer)
        remap = None
        if args.stem_remap:
            if not loaded.model.stem_tables():
                raise ValueError(
                    "--stem-remap redirects STEM table lookups, but this checkpoint "
                    "is a dense model (no STEM layers)"
                )
            remap = parse_remap(
                loaded.tokenizer,
                args.stem_remap,
                args.stem_remap_rule,
                args.stem_remap_pick,
                args.stem_remap_forms,
            )
        seq_length = loaded.config.model.seq_length
        prompt_tokens = len(loaded.tokenizer.encode(args.prompt))
        if prompt_tokens > seq_length:
            print(
                f"note: the prompt is {prompt_tokens} tokens, longer than model.seq_length="
                f"{seq_length}: the model sees only its last {seq_length} tokens",
                file=sys.stderr,
            )
        text = generate_text(
            loaded.model,
            loaded.tokenizer,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            stem_ids=remap,
        )
    except StrictLengthError as exc:
        print(
            f"error: {exc}: choose --stem-remap-rule {' or '.join(REMAP_RULES[1:])}",
            file=sys.stderr,
        )
        return 1
    except (
        CheckpointNotFoundError,
        CheckpointMismatchError,
        UnsafeCheckpointError,
        ValueError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        parallel.destroy()
    print(text)
    return 0
