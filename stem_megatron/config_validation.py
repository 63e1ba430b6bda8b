"""Checks of a run configuration that need several fields at once. Each message names the
numbers involved and what to change."""

from __future__ import annotations

from typing import Any

from stem_megatron.config import ConfigError, RopeScalingConfig, RunConfig
from stem_megatron.modes import (
    RecomputeGranularity,
    RecomputeMethod,
    RopeScalingType,
)
from stem_megatron.pipeline_split import chunk_stages


def validate(config: RunConfig) -> None:
    """Checks that need several fields at once; each message names the numbers involved."""
    m, t, o, so = config.model, config.train, config.optim, config.stem.optimizer

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def bound(key: str, value: Any, ok: bool, allowed: str) -> None:
        require(ok, f"{key} must be {allowed}, got {value}")

    for key in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "seq_length",
        "make_vocab_size_divisible_by",
        "rope_theta",
        "norm_epsilon",
        "init_method_std",
    ):
        require(getattr(m, key) > 0, f"model.{key} must be positive, got {getattr(m, key)}")
    require(
        m.hidden_size % m.num_attention_heads == 0,
        f"model.hidden_size ({m.hidden_size}) must be divisible by "
        f"model.num_attention_heads ({m.num_attention_heads})",
    )
    require(
        m.num_attention_heads % m.num_query_groups == 0,
        f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
        f"model.num_query_groups ({m.num_query_groups})",
    )
    require(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size must be positive")
    validate_rope_scaling(m.rope_scaling, require)
    layers = config.stem.layers or []
    bad = [i for i in layers if not 0 <= i < m.num_layers]
    require(not bad, f"stem.layers {bad} out of range: the model has layers 0..{m.num_layers - 1}")
    require(len(set(layers)) == len(layers), f"stem.layers has duplicates: {layers}")
    require(
        config.stem.cache_rows >= 0, f"stem.cache_rows must be >= 0, got {config.stem.cache_rows}"
    )
    require(
        config.stem.cache_rows == 0 or config.stem.storage.off_device,
        "stem.cache_rows caches rows of host-resident tables: it needs stem.storage=host or mmap",
    )
    bound(
        "stem.optimizer.lr",
        so.lr,
        so.lr is None or so.lr >= 0,
        ">= 0 (0 freezes the tables; unset: optim.lr)",
    )
    bound("stem.optimizer.weight_decay", so.weight_decay, so.weight_decay >= 0, ">= 0")
    for key in ("micro_batch_size", "global_batch_size", "train_iters", "eval_iters"):
        require(getattr(t, key) > 0, f"train.{key} must be positive, got {getattr(t, key)}")
    require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
        f"train.micro_batch_size ({t.micro_batch_size})",
    )
    require(t.eval_interval >= 0, "train.eval_interval must be >= 0 (0: only at the end)")
    bound("train.seed", t.seed, 0 <= t.seed < 2**32, "in [0, 2**32)")  # numpy's seed range
    bound("optim.lr", o.lr, o.lr > 0, "positive")
    bound("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0")
    for key in ("adam_beta1", "adam_beta2"):
        bound(f"optim.{key}", getattr(o, key), 0 <= getattr(o, key) < 1, "in [0, 1)")
    bound("optim.adam_eps", o.adam_eps, o.adam_eps > 0, "positive")
    bound(
        "optim.lr_decay_iters",
        o.lr_decay_iters,
        o.lr_decay_iters is None or o.lr_decay_iters > 0,
        "positive (unset: train.train_iters)",
    )
    require(0 <= o.min_lr <= o.lr, f"optim.min_lr ({o.min_lr}) must be in [0, optim.lr ({o.lr})]")
    decay_iters = o.lr_decay_iters if o.lr_decay_iters is not None else t.train_iters
    require(
        0 <= o.lr_warmup_iters <= decay_iters,
        f"optim.lr_warmup_iters ({o.lr_warmup_iters}) must be in [0, optim.lr_decay_iters "
        f"(or train.train_iters when unset) = {decay_iters}]",
    )
    require(o.clip_grad >= 0, f"optim.clip_grad must be >= 0, got {o.clip_grad}")
    require(config.checkpoint.save_interval >= 0, "checkpoint.save_interval must be >= 0")
    require(
        not config.checkpoint.finetune or config.checkpoint.load not in (None, "auto"),
        "checkpoint.finetune=true needs checkpoint.load to name the checkpoint whose model "
        "weights the run starts from",
    )
    require(config.logging.log_interval > 0, "logging.log_interval must be positive")
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        value = getattr(config.parallel, key)
        require(value >= 1, f"parallel.{key} must be >= 1, got {value}")
    vp = config.parallel.virtual_pipeline_model_parallel_size
    bound(
        "parallel.virtual_pipeline_model_parallel_size",
        vp,
        vp is None or vp >= 1,
        ">= 1 (unset: no interleaving)",
    )
    _validate_memory_features(config, require)
    # The layer split per (virtual) pipeline stage: megatron would only assert on it later.
    chunk_stages(config)


def _validate_memory_features(config: RunConfig, require) -> None:
    """Recomputation, sequence parallelism, DDP buckets and the dense optimizer's placement."""
    m, p, o = config.model, config.parallel, config.optim
    if m.recompute_granularity == RecomputeGranularity.FULL:
        require(
            m.recompute_method is not None,
            f"model.recompute_granularity=full needs model.recompute_method, one of "
            f"{RecomputeMethod.choices()}",
        )
        require(
            m.recompute_num_layers is not None and m.recompute_num_layers >= 1,
            f"model.recompute_granularity=full needs model.recompute_num_layers >= 1, got "
            f"{m.recompute_num_layers}",
        )
    else:
        stray = [
            f"model.{k}"
            for k in ("recompute_method", "recompute_num_layers")
            if getattr(m, k) is not None
        ]
        require(
            not stray,
            f"{', '.join(stray)} apply to model.recompute_granularity=full only "
            f"(it is {m.recompute_granularity}): set it to full or remove them",
        )
    tp = p.tensor_model_parallel_size
    if p.sequence_parallel:
        require(
            tp > 1,
            "parallel.sequence_parallel needs parallel.tensor_model_parallel_size "
            "> 1 (it splits the sequence over the tensor-parallel ranks)",
        )
        require(
            m.seq_length % tp == 0,
            f"parallel.sequence_parallel splits model.seq_length ({m.seq_length}) over "
            f"parallel.tensor_model_parallel_size ({tp}): it must be divisible",
        )
    require(
        p.ddp_bucket_size is None or p.ddp_bucket_size > 0,
        f"parallel.ddp_bucket_size must be positive (unset: megatron-core's default), got "
        f"{p.ddp_bucket_size}",
    )
    require(
        not o.optimizer_cpu_offload or o.use_distributed_optimizer,
        "optim.optimizer_cpu_offload needs optim.use_distributed_optimizer=true "
        "(megatron-core offloads the distributed optimizer's shards)",
    )
    # megatron-core 0.16.1's HybridDeviceOptimizer refuses the fp32 shards (views of the
    # parameters: "can't optimize a non-leaf Tensor"); bf16 runs hand it fp32 main copies.
    require(
        not o.optimizer_cpu_offload or config.train.bf16,
        "optim.optimizer_cpu_offload needs train.bf16=true (megatron-core offloads the "
        "fp32 main copies of bf16 parameters)",
    )
    require(
        0 < o.optimizer_offload_fraction <= 1,
        f"optim.optimizer_offload_fraction must be in (0, 1], got {o.optimizer_offload_fraction}",
    )


def validate_rope_scaling(r: RopeScalingConfig, require) -> None:
    """`require(ok, message)` raises: ConfigError here, HFFormatError for an HF import."""
    require(
        r.type in {t.value for t in RopeScalingType},
        f"model.rope_scaling.type must be one of {RopeScalingType.choices()}, got '{r.type}'",
    )
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if (
        r.type == RopeScalingType.NONE
    ):  # a value set without the type is most likely a forgotten type
        stray = [f"model.rope_scaling.{k}" for k in fields if getattr(r, k) is not None]
        require(
            not stray,
            f"{', '.join(stray)} given but model.rope_scaling.type is 'none': "
            f"set model.rope_scaling.type=llama3 or remove them",
        )
        return
    for key in fields:
        value = getattr(r, key)
        require(
            value is not None,
            f"model.rope_scaling.{key} must be set for model.rope_scaling.type={r.type}",
        )
        require(value > 0, f"model.rope_scaling.{key} must be positive, got {value}")
    require(
        r.high_freq_factor > r.low_freq_factor,
        f"model.rope_scaling.high_freq_factor ({r.high_freq_factor}) must be greater than "
        f"model.rope_scaling.low_freq_factor ({r.low_freq_factor})",
    )
