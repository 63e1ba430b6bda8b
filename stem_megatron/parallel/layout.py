"""Does a TP x PP x DP layout fit the model and the world size? Checked before anything is
allocated, by the trainer and by the dry run alike; every error names the numbers involved."""

from __future__ import annotations

from dataclasses import dataclass

from stem_megatron.config import ConfigError, RunConfig
from stem_megatron.model.transformer import padded_vocab_size
from stem_megatron.pipeline_split import PipelineStage, pipeline_stages


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp_size: int
    pp_size: int
    stages: tuple[PipelineStage, ...]
    num_microbatches: int  # per rank and step: global batch / (micro-batch x DP)

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size)


def validate_layout(config: RunConfig, world_size: int, vocab_size: int) -> ParallelLayout:
    """The layout of `config` on `world_size` ranks for a tokenizer of `vocab_size` tokens."""
    m, p, t = config.model, config.parallel, config.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) = {tp * pp}; the data-parallel size must be "
            f"a whole number"
        )
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by)
    # Megatron's TP splits heads, KV groups and d_ff (STEM tables with it) and the padded
    # vocab of embedding and head; each must split evenly.
    for name, value in (
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_query_groups", m.num_query_groups),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("the padded vocab size", padded),
    ):
        if value % tp:
            detail = (
                f" (vocab {vocab_size} rounded up to a multiple of "
                f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by})"
                if value is padded
                else ""
            )
            raise ConfigError(
                f"tensor_model_parallel_size ({tp}) does not divide {name} ({value}){detail}"
            )
    stages = pipeline_stages(m.num_layers, pp, p.pipeline_layers)
    dp = world_size // (tp * pp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})"
        )
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    if p.virtual_pipeline_model_parallel_size and microbatches % pp:
        # megatron-core's interleaved schedule runs micro-batches in groups of PP.
        raise ConfigError(
            f"the interleaved schedule (virtual_pipeline_model_parallel_size="
            f"{p.virtual_pipeline_model_parallel_size}) needs the micro-batches per step "
            f"({microbatches} = global_batch_size {t.global_batch_size} / (micro_batch_size "
            f"{t.micro_batch_size} x data-parallel size {dp})) to be a multiple of "
            f"pipeline_model_parallel_size ({pp})"
        )
    return ParallelLayout(world_size, tp, pp, tuple(stages), microbatches)
