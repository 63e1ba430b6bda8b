"""Run configuration: nested dataclasses (config_loader.py reads them from YAML plus dotted
command-line overrides, config_validation.py checks them).

Field names follow Megatron-LM where one exists (tensor_model_parallel_size, micro_batch_size,
lr_warmup_iters, save_interval, ...), so Megatron users can read a config at a glance.
Every value is type-checked on load; an unknown key or a wrong type is an error that names
the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stem_megatron.modes import (
    DecayStyle,
    Mode,
    RecomputeGranularity,
    RecomputeMethod,
    RopeScalingType,
    TableLayout,
    TableOptimizerMode,
    TableStorage,
)


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling. "none": plain RoPE. "llama3": Llama 3.1+'s rule (model/rope.py),
    every field required (Llama 3.1: factor 8, low_freq_factor 1, high_freq_factor 4,
    original_max_position_embeddings 8192; Llama 3.2: factor 32)."""

    type: RopeScalingType = RopeScalingType.NONE
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 256
    ffn_hidden_size: int = 768
    num_attention_heads: int = 8
    num_query_groups: int = 4  # grouped-query attention: KV heads
    seq_length: int = 256
    vocab_size: int | None = None  # None: the tokenizer's vocab size
    make_vocab_size_divisible_by: int = 128  # embedding/head padding; tables are never padded
    untie_embeddings_and_output_weights: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    # Activation recomputation, as Megatron-LM's flags: "full" (whole layers, chosen by
    # recompute_method and recompute_num_layers) or "selective" (the attention core); None: off.
    recompute_granularity: RecomputeGranularity | None = None
    recompute_method: RecomputeMethod | None = None  # full only: "uniform" | "block"
    recompute_num_layers: int | None = (
        None  # full only: layers per group (uniform) or per stage (block)
    )


@dataclass
class StemOptimizerConfig:
    # lazy: only rows with a gradient move (SparseAdam); exact: the same as dense AdamW
    mode: TableOptimizerMode = TableOptimizerMode.LAZY
    lr: float | None = None  # None: optim.lr. Follows the same schedule as the dense groups.
    weight_decay: float = 0.0
    # Host/mmap tables: start a table's update as soon as the step's last backward through it
    # is done, while the backward continues (only without grad clipping and without the
    # replicated DP sync, which need every gradient first; stem/overlap.py).
    overlap_update: bool = True


@dataclass
class StemConfig:
    enabled: bool = True
    layers: list[int] | None = None  # None: every other layer from layer 1 (the paper's 1/2)
    # Data parallel: "replicated" (every DP rank holds the table, row gradients all-reduced
    # over the union of touched rows) or "vocab_sharded" (rows and their optimizer state
    # owned by DP ranks; lookups all-gather the needed rows, gradients reduce-scatter).
    dp_layout: TableLayout = TableLayout.REPLICATED
    # "device": the table is a tensor on the compute device; "host": the table and its
    # optimizer state live in host memory and each micro-batch's rows are prefetched;
    # "mmap": as "host", in memory-mapped files under `mmap_dir` (tables larger than RAM).
    storage: TableStorage = TableStorage.DEVICE
    mmap_dir: str | None = None  # None: <run_dir>/stem_mmap; best on a fast local disk
    # Host and mmap tables: the rows of this many most frequent token ids (counted over the training
    # data) are also kept on the compute device and not staged; 0: no cache (stem/cache.py).
    cache_rows: int = 0
    optimizer: StemOptimizerConfig = field(default_factory=StemOptimizerConfig)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Layers per pipeline stage, e.g. [7, 9, 9, 7]; None: an even split (pipeline_split.py)
    pipeline_layers: list[int] | None = None
    # Model chunks per pipeline rank for the interleaved 1F1B schedule; None: no interleaving
    virtual_pipeline_model_parallel_size: int | None = None
    # Megatron's sequence parallelism (TP > 1): norms and residuals hold seq/TP tokens per rank.
    sequence_parallel: bool = False
    # megatron-core DDP (dense parameters; STEM tables stay row-sparse, outside its buffers)
    overlap_grad_reduce: bool = False  # all-reduce/reduce-scatter buckets during the backward
    ddp_bucket_size: int | None = None  # elements per bucket; None: megatron-core's default
    grad_reduce_in_fp32: bool = False  # bf16 runs: accumulate and reduce dense grads in fp32


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: train.train_iters
    lr_decay_style: DecayStyle = DecayStyle.COSINE
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global norm over dense parameters and STEM tables; 0 disables
    # megatron-core's DistributedOptimizer: fp32 main params and Adam moments sharded over DP
    use_distributed_optimizer: bool = False
    # Dense optimizer state and step on the host (megatron-core's names; needs the
    # distributed optimizer); the fraction of the state offloaded.
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 1.0


@dataclass
class DataConfig:
    tokenizer: str = "data/prepared/tokenizer.json"
    train_data: str = "data/prepared/shakespeare_train"  # indexed dataset prefix (.bin/.idx)
    valid_data: str | None = "data/prepared/shakespeare_val"
    # false: also accept datasets made by Megatron-LM's preprocess_data.py (no .meta.json
    # sidecar): ids are still checked against the vocab, the tokenizer match cannot be.
    require_meta: bool = True


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    global_batch_size: int = 8  # a multiple of micro_batch_size x data-parallel size
    train_iters: int = 100
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 10  # global batches per evaluation
    # Megatron's --bf16: bf16 dense parameters and activations, fp32 main parameters and
    # gradients in the optimizer. STEM tables keep fp32 rows.
    bf16: bool = False


@dataclass
class CheckpointConfig:
    save: str | None = None  # None: <run_dir>/checkpoints
    # A step dir, a checkpoints dir or a run dir (follows `latest`); "auto": resume from the
    # save dir's latest checkpoint if there is one, else start fresh (launchers, requeues).
    load: str | None = None
    # Megatron's --finetune: take only the model weights from `load` (fresh optimizer, step 0,
    # data from the start), e.g. an imported Hugging Face model. A run whose save dir already
    # holds checkpoints (a requeued finetune run) resumes them in full instead.
    finetune: bool = False
    save_interval: int = 0  # 0: only at the end


@dataclass
class LoggingConfig:
    run_dir: str | None = None  # None: runs/<config name>
    log_interval: int = 10


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    stem: StemConfig = field(default_factory=StemConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir or Path("runs") / self.name)

    @property
    def mmap_dir(self) -> Path:
        return Path(self.stem.mmap_dir) if self.stem.mmap_dir else self.run_dir / "stem_mmap"

    @property
    def save_dir(self) -> Path:
        return Path(self.checkpoint.save) if self.checkpoint.save else self.run_dir / "checkpoints"

    def stem_layers(self) -> list[int]:
        """The layer indices with a STEM FFN (empty when STEM is disabled)."""
        if not self.stem.enabled:
            return []
        if self.stem.layers is None:
            return list(range(1, self.model.num_layers, 2))
        return sorted(self.stem.layers)

    def resolved(self, vocab_size: int) -> RunConfig:
        """This config with the values left to defaults spelled out (the vocab size the
        tokenizer gave, the STEM layers chosen), as a run records it."""
        model = dataclasses.replace(self.model, vocab_size=vocab_size)
        stem = dataclasses.replace(
            self.stem, layers=self.stem_layers() if self.stem.enabled else self.stem.layers
        )
        return dataclasses.replace(self, model=model, stem=stem)

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)


def plain_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as nested plain values (modes as their strings), as YAML and JSON
    write them."""
    return dataclasses.asdict(config, dict_factory=_plain_items)


def _plain_items(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v.value if isinstance(v, Mode) else v for k, v in items}
