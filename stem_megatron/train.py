"""Entry point: `python -m stem_megatron.train --config configs/tiny.yaml key=value ...`
(also under torchrun). Parses the config, joins the process group, trains, reports."""

from __future__ import annotations

import argparse
import sys
import warnings

from stem_megatron.cli.args import HelpFormatter, positive_int
from stem_megatron.config import ConfigError
from stem_megatron.config_loader import load_config
from stem_megatron.writable import unwritable_reason


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stem_megatron.train",
        description="Train a STEM language model.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (defaults for every key not given)")
    parser.add_argument(
        "--sample-prompt",
        default="ROMEO.",
        help="prompt for the short sample printed at the end ('' to skip)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build each rank's shard on the meta device, print parameters and "
        "memory per rank type, and exit (no training, no process group)",
    )
    parser.add_argument(
        "--world-size",
        type=positive_int,
        default=None,
        help="ranks to plan the dry run for (default: TP x PP)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="dotted overrides, e.g. train.train_iters=200 stem.layers=[1,3]",
    )
    return parser.parse_intermixed_args(argv)  # overrides may sit on either side of flags


def run_paths_problem(config) -> str | None:
    """Why the run could not write its run dir (or its mmap tables), naming the key."""
    paths = {"logging.run_dir": config.run_dir}
    if config.stem.enabled and config.stem.storage == "mmap":
        paths["stem.mmap_dir"] = config.mmap_dir
    for key, path in paths.items():
        reason = unwritable_reason(path)
        if reason:
            return f"{key}: {path} cannot be written: {reason}; choose a writable {key}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.world_size is not None and not args.dry_run:
        print(
            "error: --world-size plans a --dry-run; launchers set the real world size",
            file=sys.stderr,
        )
        return 2
    # megatron-core announces that its optional CUDA accelerators are absent; they are optional.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed")
    if args.dry_run:
        from stem_megatron.planning.dry_run import run_dry_run

        return run_dry_run(config, args.world_size)
    problem = run_paths_problem(config)
    if problem:  # before the slow imports and the model build
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from stem_megatron.parallel import process_env

    try:  # threads, CUDA_DEVICE_MAX_CONNECTIONS and versions, before CUDA initialises
        threads, env_warnings = process_env.settle(config.parallel.tensor_model_parallel_size)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from stem_megatron.checkpoint.errors import (
        CheckpointExistsError,
        CheckpointMismatchError,
        CheckpointNotFoundError,
        CheckpointSaveError,
        UnsafeCheckpointError,
    )
    from stem_megatron.generation import SampleSettings, end_of_run_sample
    from stem_megatron.parallel.state import ParallelState
    from stem_megatron.training.latest_link import point_latest_at
    from stem_megatron.training.trainer import Trainer

    try:
        parallel = ParallelState.initialize(
            config.parallel.tensor_model_parallel_size,
            config.parallel.pipeline_model_parallel_size,
            config.parallel.virtual_pipeline_model_parallel_size,
        )
    except ValueError as exc:  # the launched world does not fit the layout
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            trainer = Trainer(config, parallel)
        except (
            ValueError,
            NotImplementedError,
            CheckpointNotFoundError,
            CheckpointMismatchError,
            CheckpointExistsError,
            MemoryError,
            PermissionError,
            CheckpointSaveError,
            UnsafeCheckpointError,
        ) as exc:
            # Bad data, checkpoint, layout or table tier: say what and how to fix it.
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if parallel.is_main:
            for line in env_warnings:
                print(line, file=sys.stderr, flush=True)
            n = trainer.counts
            print(
                f"model: {n.total_params / 1e6:.2f}M total / {n.active_params / 1e6:.2f}M active "
                f"parameters, STEM layers {list(trainer.stem_layers)}, "
                f"{n.flops_per_token / 1e6:.1f} MFLOPs/token; {threads.count} CPU threads per "
                f"rank ({threads.why}); run dir {config.run_dir}",
                flush=True,
            )
            note = point_latest_at(config.run_dir)  # runs/latest: this run, for the commands after
            if note:
                print(note, flush=True)
        if trainer.step >= config.train.train_iters:
            if parallel.is_main:
                print(
                    f"nothing to do: the run is at step {trainer.step} of train.train_iters="
                    f"{config.train.train_iters} (raise train.train_iters to train on)",
                    flush=True,
                )
            return 0
        try:
            result = trainer.run()
        except (FloatingPointError, CheckpointSaveError) as exc:  # diverged, or a save failed
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if result.stopped_by:  # agreed by every rank
            if parallel.is_main:
                print(
                    f"stopped at step {result.step} on {result.stopped_by} after saving a "
                    f"checkpoint; resume with checkpoint.load=auto",
                    flush=True,
                )
            return 0
        if parallel.is_main:
            val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
            print(
                f"done: step {result.step} | last step's train loss {result.train_loss:.4f} | "
                f"final val loss {val} | {result.tokens_per_s:,.0f} tok/s | "
                f"run dir {config.run_dir}",
                flush=True,
            )
        if args.sample_prompt:  # on every rank: some layouts generate collectively
            line = end_of_run_sample(
                trainer.chunks[0],
                trainer.tokenizer,
                parallel,
                SampleSettings(args.sample_prompt, config.train.seed),
                trainer.checkpointer.latest(),
            )
            if line:
                print(line, flush=True)
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
