"""Convert stem_megatron checkpoints between parallel layouts and to/from safetensors.

    # Another layout (TP / PP / virtual PP / DP / stem.dp_layout / stem.storage), model and
    # optimizer state included; runs the target layout's processes locally (gloo):
    stem-convert reshard runs/tiny runs/tiny_tp1/checkpoints \
        parallel.tensor_model_parallel_size=1 parallel.pipeline_model_parallel_size=1 \
        [--dp 2 stem.dp_layout=vocab_sharded stem.storage=host]

    # One safetensors file + a JSON (config, step, data position, which keys are optimizer state):
    stem-convert to-safetensors runs/tiny runs/tiny_st
    # ... and back to a checkpoint that training resumes from:
    stem-convert from-safetensors runs/tiny_st runs/tiny_back/checkpoints

Sources take a step dir, a checkpoints dir or a run dir (follows `latest`). Outputs must not
exist; they are written to a temporary sibling and renamed when complete. Inputs are only read.
Exit status 0 on success, 1 on a bad input (the message says what and how to fix it).
See docs/checkpoint_tools.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from stem_megatron.cli.args import HelpFormatter, positive_int


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Convert stem_megatron checkpoints.", formatter_class=HelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    reshard = sub.add_parser(
        "reshard", help="rewrite for another parallel / table layout", formatter_class=HelpFormatter
    )
    reshard.add_argument("source", help="step dir, checkpoints dir or run dir")
    reshard.add_argument("out", help="new checkpoints dir to create (gets step_<N> and latest)")
    reshard.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="target layout, e.g. parallel.tensor_model_parallel_size=2",
    )
    reshard.add_argument("--dp", type=positive_int, default=1, help="target data-parallel size")
    to_st = sub.add_parser(
        "to-safetensors",
        help="one .safetensors file + checkpoint.json",
        formatter_class=HelpFormatter,
    )
    to_st.add_argument("source", help="step dir, checkpoints dir or run dir")
    to_st.add_argument("out", help="new directory to create")
    from_st = sub.add_parser(
        "from-safetensors",
        help="a to-safetensors directory back to DCP",
        formatter_class=HelpFormatter,
    )
    from_st.add_argument("source", help="directory written by to-safetensors")
    from_st.add_argument("out", help="new checkpoints dir to create (gets step_<N> and latest)")
    for p in (reshard, to_st, from_st):
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after --dp: argparse leaves the later ones unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "reshard" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

    from stem_megatron.checkpoint.consolidated import from_safetensors, to_safetensors
    from stem_megatron.checkpoint.errors import (
        CheckpointExistsError,
        CheckpointMismatchError,
        CheckpointNotFoundError,
        UnsafeCheckpointError,
    )
    from stem_megatron.checkpoint.safetensors_io import SafetensorsFormatError
    from stem_megatron.training.reshard import ConversionError, reshard

    start = time.perf_counter()
    try:
        if args.command == "reshard":
            result = reshard(args.source, args.out, args.overrides, dp=args.dp)
        elif args.command == "to-safetensors":
            result = to_safetensors(args.source, args.out, progress=not args.quiet)
        else:
            result = from_safetensors(args.source, args.out, progress=not args.quiet)
    except (
        CheckpointNotFoundError,
        CheckpointExistsError,
        CheckpointMismatchError,
        UnsafeCheckpointError,
        SafetensorsFormatError,
        ConversionError,
        ValueError,
        KeyError,
        OSError,
    ) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result} in {time.perf_counter() - start:.1f} s")
    return 0
