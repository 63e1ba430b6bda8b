"""Memory one rank needs to train its shard of the model: dense weights, gradients and
optimizer state (planning/dense_memory.py: megatron-core's DDP buffers and optimizers), STEM
tables with their optimizer state and buffers (planning/table_memory.py), and activations
(planning/activation_memory.py). Parameter counts are read off the built shard (the dry run builds
each model chunk of the rank on the meta device), so they are those of the real model code.

STEM tables stay fp32 rows with SparseRowAdamW's state, on the `stem.storage` tier, holding
all rows or (vocab_sharded) this DP rank's block; row-sparse gradients, never a dense [V, d_ff];
they are outside DDP's buffers and the dense optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stem_megatron.config import ModelConfig
from stem_megatron.planning.activation_memory import (
    ActivationSetup,
    chunk_activations,
    chunk_passes_in_flight,
    head_bytes,
    head_transient_bytes,
)
from stem_megatron.planning.dense_memory import DenseMemory, DenseSetup, dense_memory
from stem_megatron.planning.table_memory import TableMemory, TableSetup, table_memory
from stem_megatron.sharding import get_tp_shard, is_tied_copy
from stem_megatron.stem.table import is_stem_table


@dataclass(frozen=True)
class ShardParams:
    dense: int  # parameter elements on this rank, tables excluded
    replicated: int  # of `dense`: held whole by every TP rank (the norms)
    tables: int
    table_shapes: tuple[tuple[int, int], ...]  # local [rows, columns] of each table
    tied_copy: int = 0  # of `dense`: the last stage's copy of a tied embedding (not the model's)
    # Per model chunk, its dense parameters' sizes in `parameters()` order and their
    # `shared_embedding` flags: the layout of the chunk's DDP buffers.
    chunks: tuple[tuple[tuple[int, ...], tuple[bool, ...]], ...] = ()

    def __add__(self, other: ShardParams) -> ShardParams:
        """The parameters of two model chunks of one rank together."""
        return ShardParams(
            self.dense + other.dense,
            self.replicated + other.replicated,
            self.tables + other.tables,
            self.table_shapes + other.table_shapes,
            self.tied_copy + other.tied_copy,
            self.chunks + other.chunks,
        )


def count_shard(model: torch.nn.Module) -> ShardParams:
    """The parameters of one model chunk."""
    dense = replicated = tables = tied_copy = 0
    shapes, numels, shared = [], [], []
    for param in model.parameters():
        if is_stem_table(param):
            tables += param.numel()
            shapes.append((param.shape[0], param.shape[1]))
            continue
        dense += param.numel()
        numels.append(param.numel())
        shared.append(bool(getattr(param, "shared_embedding", False)))
        if get_tp_shard(param) is None:
            replicated += param.numel()
        if is_tied_copy(param):
            tied_copy += param.numel()
    return ShardParams(
        dense, replicated, tables, tuple(shapes), tied_copy, ((tuple(numels), tuple(shared)),)
    )


@dataclass(frozen=True)
class RankMemory:
    """Bytes of one rank, by where they live (`device_total`, `host_total`, `mmap_total`)."""

    dense: DenseMemory
    tables: TableMemory
    activations_per_pass: int  # one micro-batch's stored activations in the largest chunk
    passes_in_flight: int
    activations_once: int  # on top, once: the head's, or one recomputed region's if larger
    activations: int  # passes in flight x per pass + once

    @property
    def device_total(self) -> int:
        return (
            self.dense.resident + self.tables.device + max(self.activations, self.dense.main_grads)
        )

    @property
    def host_total(self) -> int:
        return self.dense.host + self.tables.host

    @property
    def mmap_total(self) -> int:
        return self.tables.mmap


def estimate_rank_memory(
    shard: ShardParams,
    m: ModelConfig,
    *,
    chunk_layers: tuple[int, ...],
    post_process: bool,
    padded_vocab: int,
    pp_rank: int,
    pp_size: int,
    vp_size: int,
    num_microbatches: int,
    dense: DenseSetup,
    activations: ActivationSetup,
    tables: TableSetup,
) -> RankMemory:
    """`chunk_layers`: layers of each of the rank's model chunks; `post_process`: the rank
    holds the head (in its last chunk)."""
    chunk = max(
        (chunk_activations(m, n, activations) for n in chunk_layers),
        key=lambda c: c.stored + c.rebuilt,
    )
    head = (
        int(
            head_bytes(m, padded_vocab, activations)
            + head_transient_bytes(padded_vocab, m, activations)
        )
        if post_process
        else 0
    )
    in_flight = chunk_passes_in_flight(pp_rank, pp_size, vp_size, num_microbatches)
    # At a rank's peak, the end of its last warmup forward, every pass in flight holds its
    # stored activations (counted at the largest chunk's: an upper bound when layers split
    # unevenly). The last stage's head runs its backward right after its forward, and a
    # recomputed region is rebuilt only in a backward that has already freed the head's,
    # so whichever is larger is there once.
    once = max(head, chunk.rebuilt)
    return RankMemory(
        dense=dense_memory(shard.chunks, pp_rank, dense),
        tables=table_memory(shard.table_shapes, tables),
        activations_per_pass=chunk.stored,
        passes_in_flight=in_flight,
        activations_once=once,
        activations=in_flight * chunk.stored + once,
    )
