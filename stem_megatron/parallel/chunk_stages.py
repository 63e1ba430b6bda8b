"""Which layers each model chunk of each pipeline rank holds.

Without interleaving a pipeline rank holds one chunk, its pipeline stage. With
`parallel.virtual_pipeline_model_parallel_size` = v (megatron's interleaved 1F1B), the layers
are split evenly into pp x v virtual stages and virtual stage v' of pipeline rank r is number
v' * pp + r: rank 0 holds the first and the (pp+1)-th block of layers, and so on. Only virtual
stage 0 holds the embedding and only the last one the head (`pre_process`/`post_process` of
`pipeline_stages(num_layers, pp * v)`).
"""

from __future__ import annotations

from stem_megatron.config import ConfigError, RunConfig
from stem_megatron.parallel.pipeline_stages import PipelineStage, pipeline_stages


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
