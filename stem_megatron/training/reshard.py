"""Rewrite a checkpoint for another parallel layout (TP, PP, DP, virtual PP, stem.dp_layout,
stem.storage): the target layout's world is started on local gloo processes, each builds its
shard of the model and optimizers as training does, loads the source through the resume path
(TrainingState.load) and saves it again (TrainingState.save). Each process holds only its own
shard, and every tensor passes through unchanged: the round trip is bitwise.

RNG states are per rank: target rank r takes source rank r's (as a resume would); source
ranks the target world lacks are carried over unchanged so converting back restores them.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from stem_megatron.checkpoint import layout
from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.checkpoint.errors import CheckpointExistsError
from stem_megatron.checkpoint.offline import OfflineCheckpoint, publish
from stem_megatron.config import ConfigError, RunConfig
from stem_megatron.config_loader import config_from_dict
from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.parallel.data_parallel import wrap_data_parallel
from stem_megatron.parallel.dims import ParallelDims
from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.parallel.state import ParallelState
from stem_megatron.stem.tables import StemTables
from stem_megatron.training.model_chunks import build_model_chunks
from stem_megatron.training.optimizer import DenseOptimizer
from stem_megatron.training.state import TrainingState

RNG_PREFIX = "rng.torch_rank"


class ConversionError(RuntimeError):
    """A conversion failed; its message names the cause (the input is left untouched)."""


def target_config(source: dict[str, Any], overrides: list[str]) -> RunConfig:
    """The source checkpoint's config with dotted `section.key=value` overrides applied."""
    return config_from_dict(source, overrides)


def vocab_size(ckpt: OfflineCheckpoint, config: RunConfig) -> int:
    """The tokenizer vocab the model was built for: the config's, else a STEM table's row
    count (tables are never padded), else the tokenizer's."""
    if config.model.vocab_size:
        return config.model.vocab_size
    for key, info in ckpt.infos().items():
        if key.startswith("model.") and key.endswith(".stem_table.weight"):
            return info.shape[0]
    return load_tokenizer(config.data.tokenizer).vocab_size


def world_size(config: RunConfig, dp: int) -> int:
    p = config.parallel
    return p.tensor_model_parallel_size * p.pipeline_model_parallel_size * dp


class _DataPosition:
    """The data-stream position passed through: it is global (the same on every rank and under
    any DP size), so conversion needs no dataset."""

    def __init__(self) -> None:
        self.state: dict[str, int] = {}

    def state_dict(self) -> dict[str, int]:
        return self.state

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = dict(state)


def _convert_rank(
    source: str,
    tmp: str,
    build_dict: dict,
    config_dict: dict,
    vocab: int,
    carried_rng: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """One rank of the target world: build (from `build_dict`), load the source, save into
    `tmp` recording `config_dict`."""

    class CarryingState(TrainingState):
        def _state(self, *args, **kwargs) -> dict:
            state = super()._state(*args, **kwargs)
            if self.parallel.rank == 0:
                state["rng"].update(carried_rng)
            return state

    config, build = config_from_dict(config_dict), config_from_dict(build_dict)
    p = config.parallel
    parallel = ParallelState.initialize(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.virtual_pipeline_model_parallel_size,
    )
    try:
        with tqdm(total=3, desc="reshard", unit="phase", disable=parallel.rank != 0) as bar:
            bar.set_postfix_str("build")
            chunks = build_model_chunks(ParallelDims(build, parallel.world_size, vocab), parallel)
            optimizer = DenseOptimizer(wrap_data_parallel(chunks, build), chunks, build)
            tables = StemTables(chunks, build, parallel)
            state = CarryingState(chunks, optimizer, tables, _DataPosition(), parallel)
            bar.update()
            bar.set_postfix_str("load")
            step = state.load(Checkpointer(Path(source).parent), source)
            bar.update()
            bar.set_postfix_str("save")
            state.save(Checkpointer(tmp), step, config)
            bar.update()
        return {"step": step}
    except Exception as e:  # every rank fails alike (the checkpointer checks collectively)
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        parallel.destroy()


def reshard(
    source: str | os.PathLike,
    out: str | os.PathLike,
    overrides: list[str],
    dp: int = 1,
    timeout_s: float = 24 * 3600.0,
) -> Path:
    """Write the checkpoint at `source` into a new checkpoints dir `out` for the layout of
    `overrides` on tp x pp x `dp` processes; returns the new step dir. Raises ConfigError
    (bad overrides or layout), CheckpointNotFoundError, CheckpointExistsError (out exists)
    or ConversionError (e.g. overrides that do not match the stored tensors)."""
    ckpt = OfflineCheckpoint(source)
    if ckpt.metadata.get(layout.MODEL_ONLY):
        raise ConversionError(
            f"{ckpt.path} holds model weights only (a model-only checkpoint): it needs no "
            f"resharding, every layout loads it as it is with checkpoint.finetune=true"
        )
    out = Path(out)
    if out.exists():
        raise CheckpointExistsError(f"output {out} already exists; choose a new path")
    if dp < 1:
        raise ConfigError(f"--dp must be >= 1, got {dp}")
    config = target_config(ckpt.config_dict, overrides)
    vocab = vocab_size(ckpt, config)
    world = world_size(config, dp)
    ParallelDims(config, world, vocab)  # a ConfigError before any process starts
    carried = {
        key[len("rng.") :]: ckpt.read(key)
        for key in ckpt.keys()
        if key.startswith(RNG_PREFIX) and int(key[len(RNG_PREFIX) :]) >= world
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{layout.TMP_PREFIX}{out.name}_{secrets.token_hex(4)}"
    # mmap-tier tables are mapped from scratch files here, not in the source run's dir.
    scratch = tmp.with_name(tmp.name + "_mmap")
    build = copy.deepcopy(config.to_dict())
    if config.stem.storage == "mmap":
        build["stem"]["mmap_dir"] = str(scratch)
    try:
        try:
            results = run_local_workers(
                world,
                _convert_rank,
                str(ckpt.path),
                str(tmp),
                build,
                config.to_dict(),
                vocab,
                carried,
                timeout=timeout_s,
            )
        except AssertionError as e:  # a worker died or hung: its traceback is the message
            raise ConversionError(f"cannot convert {ckpt.path}: {e}") from e
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise ConversionError(f"cannot convert {ckpt.path} to the target layout: {errors[0]}")
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return out / layout.step_dir_name(ckpt.step)
