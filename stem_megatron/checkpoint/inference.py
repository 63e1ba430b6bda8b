"""Build a single-process model from a training checkpoint, for generation and tools."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stem_megatron.checkpoint import layout
from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.checkpoint.model_state import CheckpointMeshes, model_state
from stem_megatron.config import RunConfig
from stem_megatron.config_loader import config_from_dict
from stem_megatron.data.tokenizer import Tokenizer, load_tokenizer
from stem_megatron.model.transformer import ModelSpec, StemGPTModel


@dataclass
class LoadedModel:
    model: StemGPTModel
    tokenizer: Tokenizer
    config: RunConfig
    step: int


def checkpoint_config(path: str) -> tuple[RunConfig, int]:
    """The resolved config and step recorded in a checkpoint's metadata.json."""
    ckpt = layout.resolve(path)
    metadata = layout.read_json(ckpt, layout.METADATA_JSON)
    config = config_from_dict(metadata["config"])
    return config, int(metadata["step"])


def load_for_inference(path: str, tokenizer_path: str | None = None) -> LoadedModel:
    """Model weights only (optimizer state is skipped) on one process, in eval mode.

    The caller must have initialised a world-of-one ParallelState (megatron-core's layers
    read its process groups)."""
    config, step = checkpoint_config(path)
    tokenizer = load_tokenizer(tokenizer_path or config.data.tokenizer)
    vocab_size = config.model.vocab_size or tokenizer.vocab_size
    spec = ModelSpec(
        model=config.model, vocab_size=vocab_size, stem_layers=tuple(config.stem_layers())
    )
    model = StemGPTModel(spec)
    meshes = CheckpointMeshes.single(torch.device("cpu"))
    state = {"model": model_state(model.named_parameters(), meshes)}
    with torch.no_grad():
        Checkpointer(layout.resolve(path).parent).load(path, state, strict=False)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, step=step)
