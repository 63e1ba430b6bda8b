"""Parameters and memory per rank type of a config's TP/PP(/VP) layout, without a GPU or a
process group: the report of `stem-train --dry-run` (the same code).

    stem-estimate --config configs/stem_1b.yaml [--world-size 64] \
        [--json out.json] [section.key=value ...]

Overrides change the plan like the run: e.g. stem.dp_layout=vocab_sharded (each DP rank holds
its block of table rows), stem.storage=host|mmap (tables and their optimizer state counted in
host RAM or mmap files; the device keeps staging buffers and stem.cache_rows), or
parallel.virtual_pipeline_model_parallel_size=2 (interleaved chunks per pipeline rank).
--json must name a new file (an existing one is never overwritten).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from stem_megatron.cli.args import HelpFormatter, positive_int


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Estimate per-rank parameters and memory.", formatter_class=HelpFormatter
    )
    ap.add_argument("--config", required=True, help="YAML config file")
    ap.add_argument(
        "--world-size",
        type=positive_int,
        default=None,
        help="ranks to plan for (default: TP x PP, one model replica)",
    )
    ap.add_argument("--json", help="also write the numbers to this new JSON file")
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="dotted config overrides, e.g. stem.dp_layout=vocab_sharded",
    )
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

    from stem_megatron.config import ConfigError
    from stem_megatron.config_loader import load_config
    from stem_megatron.planning.dry_run import run_dry_run

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return run_dry_run(config, args.world_size, args.json)
