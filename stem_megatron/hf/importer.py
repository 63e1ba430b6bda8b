"""Import a Hugging Face Llama directory as a STEM model for continued pretraining.

This is how the STEM paper made its 1B model from a dense Llama: the dense weights are
copied, the up-projection of every STEM layer is dropped (the table replaces it), and the
tables start fresh: xavier-normal, drawn exactly as our model initialises them for the
run's seed. The output directory holds

    checkpoints/step_0/   a model-only checkpoint (metadata.json "model_only": true)
    checkpoints/latest
    config.yaml           ready for continued pretraining: checkpoint.load points at the
                          checkpoint with checkpoint.finetune=true (fresh optimizer, step 0),
                          tables get their own LR (stem.optimizer.lr)
    tokenizer.json        (or tokenizer.model) copied from the HF dir; data.tokenizer points at it

Paths in config.yaml are absolute (the final output path). The caller must have
initialised a world-of-one ParallelState (megatron-core's layers read its groups).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.checkpoint.model_state import CheckpointMeshes, model_state
from stem_megatron.config import ConfigError, ModelConfig, RunConfig, load_config, save_config
from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.hf.llama_config import (ARCHITECTURE_FIELDS, HFFormatError,
                                           model_config_from_hf, read_hf_config)
from stem_megatron.hf.safetensors_dir import SafetensorsDir
from stem_megatron.hf.staged_output import staged_output_dir
from stem_megatron.hf.weights import hf_names, megatron_from_hf
from stem_megatron.model.transformer import ModelSpec, StemGPTModel
from stem_megatron.training.state import MODEL_ONLY

# The paper's continued pretraining from dense Llama-3.2-1B: backbone 1e-5, tables 5e-4
# without weight decay. Override with --config optim.lr=... stem.optimizer.lr=...
CONTINUED_PRETRAINING = {"optim": {"lr": 1e-5, "min_lr": 1e-6},
                         "stem": {"optimizer": {"lr": 5e-4, "weight_decay": 0.0}}}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what our data/tokenizer.py reads
# HF tensors that hold no weights of the model (buffers some old checkpoints saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_tensor_names(weights: SafetensorsDir, m: ModelConfig) -> None:
    tied = not m.untie_embeddings_and_output_weights
    expected = set(hf_names(m, set(), tied, with_tables=False))
    missing = sorted(expected - weights.names)
    unknown = sorted(n for n in weights.names - expected
                     if not n.endswith(_IGNORED_SUFFIXES) and not (tied and n == "lm_head.weight"))
    if missing or unknown:
        raise HFFormatError(
            f"{weights.dir}: the weights do not match a Llama model of its config.json: "
            f"missing {missing[:5] or 'none'}, unexpected {unknown[:5] or 'none'}")


def _continued_pretraining_config(m: ModelConfig, out: Path, tokenizer: Path | None,
                                  overrides: list[str], staging: Path) -> RunConfig:
    """The run config: HF architecture, paper LRs, finetune from the checkpoint, then the
    user's overrides, of which those changing the architecture are refused."""
    tree = {"name": out.name, "model": dataclasses.asdict(m), **CONTINUED_PRETRAINING,
            "checkpoint": {"load": str(out / "checkpoints"), "finetune": True}}
    if tokenizer is not None:
        tree["data"] = {"tokenizer": str(out / tokenizer.name)}
    base = staging / "config.yaml"
    base.write_text(yaml.safe_dump(tree, sort_keys=False))
    config = load_config(base, overrides)
    changed = [f"model.{key}" for key in ARCHITECTURE_FIELDS
               if getattr(config.model, key) != getattr(m, key)]
    if changed:
        raise ConfigError(f"{', '.join(changed)} cannot be overridden: the imported weights fix "
                          f"them (allowed model overrides: seq_length, "
                          f"make_vocab_size_divisible_by, init_method_std)")
    return config


def import_llama(hf_dir: Path, out: Path, overrides: list[str] | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Write the STEM (or, with stem.enabled=false, dense) import of `hf_dir` to `out`."""
    hf_dir, out = Path(hf_dir), Path(out).absolute()
    model_cfg = model_config_from_hf(read_hf_config(hf_dir), str(hf_dir / "config.json"))
    weights = SafetensorsDir(hf_dir)
    _check_tensor_names(weights, model_cfg)
    tokenizer_src = next((hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).is_file()), None)
    with staged_output_dir(out) as staging:
        config = _continued_pretraining_config(model_cfg, out, tokenizer_src, overrides or [],
                                               staging)
        if tokenizer_src is None:
            log(f"warning: {hf_dir} has no {' or '.join(TOKENIZER_FILES)}: set data.tokenizer "
                f"in {out / 'config.yaml'} before training")
        else:
            shutil.copyfile(tokenizer_src, staging / tokenizer_src.name)
            tokenizer = load_tokenizer(staging / tokenizer_src.name)
            if tokenizer.vocab_size > model_cfg.vocab_size:
                raise HFFormatError(f"{tokenizer_src} has {tokenizer.vocab_size} tokens but the "
                                    f"model's vocab_size is {model_cfg.vocab_size}")
        stem_layers = config.stem_layers()
        spec = ModelSpec(model=config.model, vocab_size=model_cfg.vocab_size,
                         stem_layers=tuple(stem_layers))
        log(f"building the model: {config.model.num_layers} layers, STEM in {stem_layers or 'none'}")
        model = StemGPTModel(spec)
        model.init_parameters(config.train.seed)  # the tables keep this xavier-normal draw
        with tqdm(desc="reading HF weights", unit="tensor", disable=None) as bar:
            def read(name: str) -> torch.Tensor:
                bar.update()
                return weights.read(name)
            dense = megatron_from_hf(read, config.model, spec.padded_vocab_size, set(stem_layers))
        missing, unexpected = model.load_state_dict(dense, strict=False)
        not_loaded = [n for n in missing if not n.endswith(("stem_table.weight", "_extra_state"))]
        if not_loaded or unexpected:  # the mapping and the model disagree: our bug, not input
            raise RuntimeError(f"HF import mapping incomplete: not loaded {not_loaded}, "
                               f"unexpected {unexpected}")
        del dense
        log(f"writing the checkpoint to {out / 'checkpoints'}")
        metadata = {"step": 0, "data": None, "config": config.to_dict(), MODEL_ONLY: True,
                    "source": {"hf_dir": str(hf_dir.absolute()), "tables": "xavier_normal"}}
        state = {"model": model_state(model.named_parameters(),
                                      CheckpointMeshes.single(torch.device("cpu")))}
        Checkpointer(staging / "checkpoints").save(0, state, metadata)
        save_config(config, staging / "config.yaml")
    log(f"imported {hf_dir} -> {out}; train with --config {out / 'config.yaml'} "
        f"data.train_data=... data.valid_data=...")
    return out
