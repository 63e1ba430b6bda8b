"""Import a Hugging Face Llama directory as a STEM model for continued pretraining.

This is how the STEM paper made its 1B model from a dense Llama: the dense weights are
copied, the up-projection of every STEM layer is dropped (the table replaces it), and the
tables start fresh: xavier-normal, drawn exactly as our model initialises them for the
run's seed. Optionally (`Calibration`) the tables start from the dense model's own
up-projection averaged per token instead (hf/table_calibration.py). The output holds

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

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.checkpoint.layout import MODEL_ONLY
from stem_megatron.checkpoint.model_state import CheckpointMeshes, model_state
from stem_megatron.config import ConfigError, ModelConfig, RunConfig, plain_dict
from stem_megatron.config_loader import load_config, save_config
from stem_megatron.data.indexed import check_vocab, open_dataset
from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.hf.llama_config import (
    ARCHITECTURE_FIELDS,
    HFFormatError,
    model_config_from_hf,
    read_hf_config,
)
from stem_megatron.hf.safetensors_dir import SafetensorsDir
from stem_megatron.hf.staged_output import staged_output_dir
from stem_megatron.hf.table_calibration import calibrated_tables
from stem_megatron.hf.weights import drop_up_projection, llama_names, megatron_from_hf
from stem_megatron.model.transformer import ModelSpec, StemGPTModel

# The paper's continued pretraining from dense Llama-3.2-1B: backbone 1e-5, tables 5e-4
# without weight decay. Override with --config optim.lr=... stem.optimizer.lr=...
CONTINUED_PRETRAINING = {
    "optim": {"lr": 1e-5, "min_lr": 1e-6},
    "stem": {"optimizer": {"lr": 5e-4, "weight_decay": 0.0}},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what our data/tokenizer.py reads
# HF tensors that hold no weights of the model (buffers some old checkpoints saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_tensor_names(weights: SafetensorsDir, m: ModelConfig) -> None:
    tied = not m.untie_embeddings_and_output_weights
    expected = set(llama_names(m, tied))
    missing = sorted(expected - weights.names)
    unknown = sorted(
        n
        for n in weights.names - expected
        if not n.endswith(_IGNORED_SUFFIXES) and not (tied and n == "lm_head.weight")
    )
    if missing or unknown:
        raise HFFormatError(
            f"{weights.dir}: the weights do not match a Llama model of its config.json: "
            f"missing {missing[:5] or 'none'}, unexpected {unknown[:5] or 'none'}"
        )


def _continued_pretraining_config(
    m: ModelConfig, out: Path, tokenizer: Path | None, overrides: list[str], staging: Path
) -> RunConfig:
    """The run config: HF architecture, paper LRs, finetune from the checkpoint, then the
    user's overrides, of which those changing the architecture are refused."""
    tree = {
        "name": out.name,
        "model": plain_dict(m),
        **CONTINUED_PRETRAINING,
        "checkpoint": {"load": str(out / "checkpoints"), "finetune": True},
    }
    if tokenizer is not None:
        tree["data"] = {"tokenizer": str(out / tokenizer.name)}
    base = staging / "config.yaml"
    base.write_text(yaml.safe_dump(tree, sort_keys=False))
    config = load_config(base, overrides)
    changed = [
        f"model.{key}"
        for key in ARCHITECTURE_FIELDS
        if getattr(config.model, key) != getattr(m, key)
    ]
    if changed:
        raise ConfigError(
            f"{', '.join(changed)} cannot be overridden: the imported weights fix "
            f"them (allowed model overrides: seq_length, "
            f"make_vocab_size_divisible_by, init_method_std)"
        )
    return config


@dataclass(frozen=True)
class Calibration:
    """Optional table initialisation from the dense model (hf/table_calibration.py): a
    dataset prefix tokenized with the HF directory's tokenizer, and how many tokens to run."""

    data: str
    max_tokens: int = 262_144


def _copy_tokenizer(source: Path | None, staging: Path, vocab_size: int):
    """Copy the HF tokenizer into the output; returns it loaded (None: the HF dir has none)."""
    if source is None:
        return None
    shutil.copyfile(source, staging / source.name)
    tokenizer = load_tokenizer(staging / source.name)
    if tokenizer.vocab_size > vocab_size:
        raise HFFormatError(
            f"{source} has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}"
        )
    return tokenizer


def _calibration_tokens(calibration: Calibration, tokenizer, vocab_size: int):
    if tokenizer is None:
        raise HFFormatError(
            "table calibration needs the HF directory's tokenizer (tokenizer.json "
            "or tokenizer.model): the calibration data must be tokenized with it"
        )
    dataset = open_dataset(calibration.data, vocab_size=vocab_size)
    check_vocab(dataset, vocab_size, tokenizer)
    return dataset.tokens


def _stem_model(
    config: RunConfig,
    spec: ModelSpec,
    dense: dict[str, torch.Tensor],
    tables: dict[int, torch.Tensor] | None,
) -> StemGPTModel:
    """Our model holding the dense weights (up-projection of STEM layers dropped) and the
    tables: `tables`, or the xavier-normal draw of our init for the run's seed."""
    model = StemGPTModel(spec)
    model.init_parameters(config.train.seed)
    stem_layers = set(spec.stem_layers)
    weights = drop_up_projection(dense, stem_layers, config.model.ffn_hidden_size)
    for layer, table in (tables or {}).items():
        weights[f"decoder.layers.{layer}.mlp.stem_table.weight"] = table
    missing, unexpected = model.load_state_dict(weights, strict=False)
    allowed = ("_extra_state",) if tables else ("_extra_state", "stem_table.weight")
    not_loaded = [n for n in missing if not n.endswith(allowed)]
    if not_loaded or unexpected:  # the mapping and the model disagree: our bug, not input
        raise RuntimeError(
            f"HF import mapping incomplete: not loaded {not_loaded}, unexpected {unexpected}"
        )
    return model


def import_llama(
    hf_dir: Path,
    out: Path,
    overrides: list[str] | None = None,
    calibration: Calibration | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the STEM (or, with stem.enabled=false, dense) import of `hf_dir` to `out`."""
    hf_dir, out = Path(hf_dir), Path(out).absolute()
    model_cfg = model_config_from_hf(read_hf_config(hf_dir), str(hf_dir / "config.json"))
    weights = SafetensorsDir(hf_dir)
    _check_tensor_names(weights, model_cfg)
    tokenizer_src = next((hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).is_file()), None)
    vocab = model_cfg.vocab_size
    with staged_output_dir(out) as staging:
        config = _continued_pretraining_config(
            model_cfg, out, tokenizer_src, overrides or [], staging
        )
        tokenizer = _copy_tokenizer(tokenizer_src, staging, vocab)
        if tokenizer is None:
            log(
                f"warning: {hf_dir} has no {' or '.join(TOKENIZER_FILES)}: set data.tokenizer "
                f"in {out / 'config.yaml'} before training"
            )
        stem_layers = config.stem_layers()
        tokens = None
        if calibration is not None and stem_layers:
            tokens = _calibration_tokens(calibration, tokenizer, vocab)
        spec = ModelSpec(model=config.model, vocab_size=vocab, stem_layers=tuple(stem_layers))
        with tqdm(desc="reading HF weights", unit="tensor", disable=None) as bar:

            def read(name: str) -> torch.Tensor:
                bar.update()
                return weights.read(name)

            dense = megatron_from_hf(read, config.model, spec.padded_vocab_size)
        tables = None
        if tokens is not None:
            tables = calibrated_tables(
                dense, config.model, vocab, stem_layers, tokens, calibration.max_tokens, log=log
            )
        log(
            f"building the model: {config.model.num_layers} layers, STEM in "
            f"{stem_layers or 'none'}, tables {'calibrated' if tables else 'xavier-normal'}"
        )
        model = _stem_model(config, spec, dense, tables)
        del dense, tables
        log(f"writing the checkpoint to {out / 'checkpoints'}")
        source = {"hf_dir": str(hf_dir.absolute()), "tables": "xavier_normal"}
        if tokens is not None:
            source["tables"] = {
                "calibrated": str(calibration.data),
                "max_tokens": calibration.max_tokens,
            }
        metadata = {
            "step": 0,
            "data": None,
            "config": config.to_dict(),
            MODEL_ONLY: True,
            "source": source,
        }
        state = {
            "model": model_state(
                model.named_parameters(), CheckpointMeshes.single(torch.device("cpu"))
            )
        }
        Checkpointer(staging / "checkpoints").save(0, state, metadata)
        save_config(config, staging / "config.yaml")
    log(
        f"imported {hf_dir} -> {out}; train with --config {out / 'config.yaml'} "
        f"data.train_data=... data.valid_data=..."
    )
    return out
