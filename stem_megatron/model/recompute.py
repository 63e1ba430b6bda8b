"""Activation recomputation with Megatron-LM's settings (`model.recompute_granularity`,
`recompute_method`, `recompute_num_layers`, read from the TransformerConfig as megatron-core's
TransformerBlock reads them).

- full, uniform: the chunk's layers in groups of `recompute_num_layers`; each group keeps only
  its input and runs again in the backward.
- full, block: the first `recompute_num_layers` layers of the chunk (each pipeline stage, or
  virtual stage) are recomputed one by one, the rest keep their activations.
- selective: the attention core (model/transformer.py's SelfAttention.core: RoPE and
  scaled_dot_product_attention) runs again from the qkv projection.

The engine is megatron-core's `tensor_parallel.checkpoint` (CheckpointFunction) for both: it
restores the CPU, CUDA and model-parallel RNG tracker states before recomputing, so anything
random in a region (dropout, if added) draws the same numbers twice; CheckpointWithoutOutput
would also drop the region's output, but here that output is what the next linear saves anyway.
Regions are recomputed only in training with autograd on (as Megatron), never in evaluation.

A recomputed region holding host-resident STEM tables takes one prefetched slot per table and
micro-batch, as without recomputation: see stem/table.py's StagedReplay. Device tables are
read again (nothing updates them before the step's backward has ended). A vocab-sharded
table's lookup is a collective, and its recompute repeats it in the backward (every DP rank
runs the same schedule, so they meet), moving its rows twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig

from stem_megatron.modes import RecomputeGranularity, RecomputeMethod
from stem_megatron.stem.table import StagedReplay, StemTable


def checkpointed(function: Callable, config: TransformerConfig, *args: torch.Tensor):
    """`function(*args)`, keeping only `args` for the backward, which recomputes the rest."""
    return tensor_parallel.checkpoint(function, config.distribute_saved_activations, *args)


class _Region:
    """Consecutive layers run as one recomputed function (called twice by CheckpointFunction)."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self.layers = layers
        self.tables = [m for layer in layers for m in layer.modules() if isinstance(m, StemTable)]
        self.replay = StagedReplay()

    def __call__(self, x: torch.Tensor, *layer_args: torch.Tensor) -> torch.Tensor:
        with self.replay.attached(self.tables):
            return _through(self.layers, x, layer_args)


def _through(layers: Sequence[torch.nn.Module], x: torch.Tensor, layer_args) -> torch.Tensor:
    for layer in layers:
        x = layer(x, *layer_args)
    return x


def recompute_groups(num_layers: int, config: TransformerConfig) -> list[tuple[int, int, bool]]:
    """The chunk's layers as (start, end, recomputed) runs, by Megatron's method."""
    n = config.recompute_num_layers
    if config.recompute_method == RecomputeMethod.UNIFORM:
        return [(i, min(i + n, num_layers), True) for i in range(0, num_layers, n)]
    if config.recompute_method == RecomputeMethod.BLOCK:
        return [(i, i + 1, i < n) for i in range(num_layers)]
    raise ValueError(
        f"recompute_method must be 'uniform' or 'block', got {config.recompute_method!r}"
    )


def run_layers(
    layers: Sequence[torch.nn.Module],
    config: TransformerConfig,
    training: bool,
    x: torch.Tensor,
    *layer_args: torch.Tensor,
) -> torch.Tensor:
    """x through `layers` (each called as layer(x, *layer_args)), with full recomputation
    where the config asks for it."""
    if config.recompute_granularity != RecomputeGranularity.FULL or not (
        training and torch.is_grad_enabled()
    ):
        return _through(layers, x, layer_args)
    for start, end, recomputed in recompute_groups(len(layers), config):
        if recomputed:
            x = checkpointed(_Region(layers[start:end]), config, x, *layer_args)
        else:
            x = _through(layers[start:end], x, layer_args)
    return x
