"""Hugging Face import and export of stem_megatron checkpoints (offline: no hub access).

    stem-hf import --hf-dir path/to/llama --out runs/llama_stem \
        [--config stem.layers=[1,3,5] optim.lr=2e-5 ...] [--calibration-data PREFIX]
    stem-hf export --checkpoint runs/x/checkpoints --out exported/x \
        [--tokenizer path]

import: a Llama-format directory (config.json + safetensors) -> a model-only checkpoint with
fresh STEM tables and a config.yaml for continued pretraining (see docs/huggingface.md).
export: any checkpoint (step dir, checkpoints dir or run dir) -> a directory that
transformers loads: LlamaForCausalLM for dense models, our StemLlamaForCausalLM
(trust_remote_code=True) for STEM models. Outputs are written to a temporary path and
renamed when complete; an existing output path is an error; inputs are only read.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from stem_megatron.cli.args import HelpFormatter, positive_int


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import",
        help="Hugging Face Llama directory -> STEM checkpoint",
        formatter_class=HelpFormatter,
    )
    imp.add_argument(
        "--hf-dir",
        required=True,
        type=Path,
        help="Llama-format directory: config.json, safetensors, tokenizer",
    )
    imp.add_argument("--out", required=True, type=Path, help="new directory to create")
    imp.add_argument(
        "--config",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of the written config, e.g. stem.layers=[1,2] "
        "stem.enabled=false model.seq_length=2048",
    )
    imp.add_argument(
        "--calibration-data",
        metavar="PREFIX",
        help="initialise the tables from the dense model's up-projection averaged "
        "per token over this dataset (tokenized with the HF tokenizer) "
        "instead of xavier-normal; see docs/huggingface.md",
    )
    imp.add_argument(
        "--calibration-tokens",
        type=positive_int,
        default=262_144,
        help="tokens of --calibration-data to run",
    )
    exp = sub.add_parser(
        "export", help="checkpoint -> Hugging Face directory", formatter_class=HelpFormatter
    )
    exp.add_argument("--checkpoint", required=True, help="step dir, checkpoints dir or run dir")
    exp.add_argument("--out", required=True, type=Path, help="new directory to create")
    exp.add_argument("--tokenizer", help="tokenizer path (default: the one in the run's config)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.out.exists():  # fail before the slow imports; the writers check again
        print(f"error: output path {args.out} already exists; choose a new path", file=sys.stderr)
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

    from stem_megatron.checkpoint.errors import (
        CheckpointMismatchError,
        CheckpointNotFoundError,
        UnsafeCheckpointError,
    )
    from stem_megatron.config import ConfigError
    from stem_megatron.hf.exporter import export_checkpoint
    from stem_megatron.hf.importer import Calibration, import_llama
    from stem_megatron.hf.llama_config import HFFormatError
    from stem_megatron.parallel.state import ParallelState

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    parallel = ParallelState.initialize()  # a world of one: megatron's layers need its groups
    try:
        if args.command == "import":
            calibration = (
                Calibration(args.calibration_data, args.calibration_tokens)
                if args.calibration_data
                else None
            )
            import_llama(args.hf_dir, args.out, args.config, calibration, log=log)
        else:
            export_checkpoint(args.checkpoint, args.out, args.tokenizer, log=log)
    except (
        HFFormatError,
        ConfigError,
        CheckpointNotFoundError,
        CheckpointMismatchError,
        UnsafeCheckpointError,
        FileExistsError,
        ValueError,
    ) as exc:  # ValueError: also bad datasets, tokenizers
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        parallel.destroy()
    print(args.out)
    return 0
