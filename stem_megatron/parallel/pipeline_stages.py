"""Which transformer layers each pipeline stage holds.

`parallel.pipeline_layers` lists the number of layers per stage (uneven splits allowed, e.g.
fewer layers on the first stage, which under 1F1B keeps the most micro-batches in flight, and
on the last, which also holds the LM head and the loss). Without it the split is as even as
possible; leftover layers go to the middle stages first, then to the first, never to the last
(it already carries the head and the vocab-sized logits).

The first stage holds the embedding (`pre_process`), the last the final norm, head and loss
(`post_process`); ModelSpec takes all three fields as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from stem_megatron.config import ConfigError


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
