"""Which transformer layers each pipeline stage, and each model chunk of a pipeline rank, holds.

`parallel.pipeline_layers` lists the number of layers per stage (uneven splits allowed, e.g.
fewer layers on the first stage, which under 1F1B keeps the most micro-batches in flight, and
on the last, which also holds the LM head and the loss). Without it the split is as even as
possible; leftover layers go to the middle stages first, then to the first, never to the last
(it already carries the head and the vocab-sized logits).

The first stage holds the embedding (`pre_process`), the last the final norm, head and loss
(`post_process`); ModelSpec takes all three fields as they are.

Without interleaving a pipeline rank holds one chunk, its pipeline stage. With
`parallel.virtual_pipeline_model_parallel_size` = v (megatron's interleaved 1F1B), the layers
are split evenly into pp x v virtual stages and virtual stage v' of pipeline rank r is number
v' * pp + r: rank 0 holds the first and the (pp+1)-th block of layers, and so on. Only virtual
stage 0 holds the embedding and only the last one the head.

Pure functions of the config: the config loader checks the split with them, so they sit just
above config.py and below everything that builds a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from stem_megatron.config import ConfigError, RunConfig


@dataclass(frozen=True)
class PipelineStage:
    index: int
    layers: tuple[int, ...]  # global layer numbers
    pre_process: bool
    post_process: bool


def even_layer_counts(num_layers: int, pp_size: int) -> list[int]:
    base, extra = divmod(num_layers, pp_size)
    counts = [base] * pp_size
    preference = list(range(1, pp_size - 1)) + [0]  # middle stages, then the first
    for stage in preference[:extra]:
        counts[stage] += 1
    return counts


def stage_layer_counts(
    num_layers: int, pp_size: int, pipeline_layers: list[int] | None = None
) -> list[int]:
    """Layers per stage; raises ConfigError naming the numbers when no valid split exists."""
    if pp_size > num_layers:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size ({pp_size}) is larger than "
            f"model.num_layers ({num_layers}): every pipeline stage needs at least one layer"
        )
    if pipeline_layers is None:
        return even_layer_counts(num_layers, pp_size)
    if len(pipeline_layers) != pp_size:
        raise ConfigError(
            f"parallel.pipeline_layers {pipeline_layers} has {len(pipeline_layers)} entries; "
            f"parallel.pipeline_model_parallel_size is {pp_size}"
        )
    if min(pipeline_layers) < 1:
        raise ConfigError(
            f"parallel.pipeline_layers {pipeline_layers}: every stage needs at least one layer"
        )
    if sum(pipeline_layers) != num_layers:
        raise ConfigError(
            f"parallel.pipeline_layers {pipeline_layers} sums to {sum(pipeline_layers)}; "
            f"model.num_layers is {num_layers}"
        )
    return list(pipeline_layers)


def pipeline_stages(
    num_layers: int, pp_size: int, pipeline_layers: list[int] | None = None
) -> list[PipelineStage]:
    counts = stage_layer_counts(num_layers, pp_size, pipeline_layers)
    stages, first = [], 0
    for index, count in enumerate(counts):
        stages.append(
            PipelineStage(
                index,
                tuple(range(first, first + count)),
                pre_process=index == 0,
                post_process=index == pp_size - 1,
            )
        )
        first += count
    return stages


def virtual_pipeline_size(config: RunConfig) -> int:
    """Model chunks per pipeline rank (1: no interleaving)."""
    return config.parallel.virtual_pipeline_model_parallel_size or 1


def chunk_stages(config: RunConfig) -> list[list[PipelineStage]]:
    """Per pipeline rank, the stages of its model chunks in chunk order; raises ConfigError
    naming the numbers when the interleaved split is impossible."""
    p, num_layers = config.parallel, config.model.num_layers
    pp, vp = p.pipeline_model_parallel_size, virtual_pipeline_size(config)
    if vp == 1:
        return [[stage] for stage in pipeline_stages(num_layers, pp, p.pipeline_layers)]
    if pp == 1:
        raise ConfigError(
            f"parallel.virtual_pipeline_model_parallel_size ({vp}) needs "
            f"pipeline_model_parallel_size > 1 (megatron's interleaved schedule interleaves "
            f"pipeline stages); unset it or use more pipeline stages"
        )
    if p.pipeline_layers is not None:
        raise ConfigError(
            "parallel.pipeline_layers cannot be combined with "
            "parallel.virtual_pipeline_model_parallel_size (the interleaved "
            "split is even)"
        )
    if num_layers < pp * vp:
        raise ConfigError(
            f"model.num_layers ({num_layers}) is smaller than pipeline_model_parallel_size x "
            f"virtual_pipeline_model_parallel_size ({pp} x {vp}): every virtual stage needs "
            f"a layer"
        )
    virtual = pipeline_stages(num_layers, pp * vp)
    return [[virtual[v * pp + rank] for v in range(vp)] for rank in range(pp)]
