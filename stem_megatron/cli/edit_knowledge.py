"""Edit what a STEM model knows by editing its table rows; writes a NEW checkpoint.

    stem-edit --checkpoint runs/tiny --output runs/tiny_edited \\
        --swap "Spain=Germany" [--copy "A=B"] [--average "A+B"] [--inject "X=A+B+C"] \\
        [--layers 1,3] [--rule strict|repeat|pick|average] [--pick -1] [--forms inner|both] \\
        [--tokenizer PATH]

Edits apply in the order given, to the STEM tables of every STEM layer (or of --layers),
together with the rows' optimizer moments, so training can resume from the output
(`checkpoint.load=runs/tiny_edited`). `--output` is a new checkpoints dir (step_<N>/ and
`latest`), written to a temporary path and renamed when complete; it must not exist, and
the input is never modified. Entities are text (tokenized as inside a sentence, after a
space; `--forms both` also edits the start-of-text form) or token ids (`id:812,77`); `--rule`
says how entities of different token lengths line up (see docs/knowledge_editing.md).
"""

from __future__ import annotations

import argparse
import sys
import warnings

# Light imports only: arguments and edits are checked before torch loads.
from stem_megatron.cli.args import HelpFormatter, int_list
from stem_megatron.editing.entities import FORMS, RULES, EditError, StrictLengthError
from stem_megatron.editing.spec import SYNTAX, EditSpec


class _EditAction(argparse.Action):
    """Collects every edit flag into one list, keeping the order they were given in."""

    def __call__(self, parser, namespace, value, option_string=None):
        edits = getattr(namespace, "edits", None) or []
        edits.append((self.dest, value))
        namespace.edits = edits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Swap, copy, average or inject STEM table rows "
        "and write the result as a new checkpoint.",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--checkpoint", required=True, help="step dir, checkpoints dir or run dir")
    ap.add_argument("--output", required=True, help="new checkpoints dir to create")
    for operation, syntax in SYNTAX.items():
        ap.add_argument(
            f"--{operation}", dest=operation, action=_EditAction, metavar="SPEC", help=syntax
        )
    ap.add_argument("--layers", type=int_list, help="STEM layers to edit (default: all)")
    ap.add_argument(
        "--rule",
        choices=RULES,
        default="strict",
        help="how entities of different token lengths line up (strict: refuse)",
    )
    ap.add_argument("--pick", type=int, default=-1, help="source token the pick rule takes")
    ap.add_argument(
        "--forms",
        choices=FORMS,
        default="inner",
        help="text entities as inside a sentence (inner, default) or also at the "
        "start of a text (both)",
    )
    ap.add_argument("--tokenizer", help="tokenizer path (default: the one in the run's config)")
    args = ap.parse_args(argv)
    if not getattr(args, "edits", None):
        ap.error("give at least one edit: --swap, --copy, --average or --inject")
    try:
        specs = [EditSpec.parse(operation, text) for operation, text in args.edits]
    except EditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

    from stem_megatron.checkpoint.errors import (
        CheckpointExistsError,
        CheckpointNotFoundError,
        UnsafeCheckpointError,
    )
    from stem_megatron.editing.edit import edit_checkpoint

    try:
        out = edit_checkpoint(
            args.checkpoint,
            args.output,
            specs,
            layers=args.layers,
            rule=args.rule,
            pick=args.pick,
            forms=args.forms,
            tokenizer_path=args.tokenizer,
        )
    except StrictLengthError as exc:
        others = [rule for rule in RULES if rule != "strict"]
        print(
            f"error: {exc}: choose --rule {', '.join(others[:-1])} or {others[-1]}", file=sys.stderr
        )
        return 1
    except (
        EditError,
        CheckpointExistsError,
        CheckpointNotFoundError,
        UnsafeCheckpointError,
        ValueError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
