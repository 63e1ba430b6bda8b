"""Memory one rank needs to train its shard of the model: weights, gradients, optimizer states,
STEM tables with their optimizer state and buffers (model/table_memory.py), and activations.
Parameter counts are read off the built shard (the dry run builds each model chunk of the rank
on the meta device), so they are those of the real model code.

What is stored today (see training/optimizer.py, parallel/data_parallel.py, stem/):
- dense parameters in fp32 (train.bf16 is autocast only: no bf16 copy, no master weights);
  fp32 gradients, plus torch DDP's bucket copy of them when DP > 1 (gradient_as_bucket_view is
  off); AdamW's exp_avg and exp_avg_sq in fp32. With bf16 parameters and fp32 master weights
  (Megatron's mixed precision) dense weights would take 2 + 4 bytes per parameter instead of 4.
- STEM tables in fp32 with SparseRowAdamW's state, on the `stem.storage` tier, holding all rows
  or (vocab_sharded) this DP rank's block; row-sparse gradients, never a dense [V, d_ff].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stem_megatron.config import ModelConfig
from stem_megatron.model.sharding import get_tp_shard, is_tied_copy
from stem_megatron.model.table_memory import FP32, TableMemory, TableSetup, table_memory
from stem_megatron.stem.table import is_stem_table


@dataclass(frozen=True)
class ShardParams:
    dense: int  # parameter elements on this rank, tables excluded
    replicated: int  # of `dense`: held whole by every TP rank (the norms)
    tables: int
    table_shapes: tuple[tuple[int, int], ...]  # local [rows, columns] of each table
    tied_copy: int = 0  # of `dense`: the last stage's copy of a tied embedding (not the model's)

    def __add__(self, other: "ShardParams") -> "ShardParams":
        """The parameters of two model chunks of one rank together."""
        return ShardParams(self.dense + other.dense, self.replicated + other.replicated,
                           self.tables + other.tables, self.table_shapes + other.table_shapes,
                           self.tied_copy + other.tied_copy)


def count_shard(model: torch.nn.Module) -> ShardParams:
    dense = replicated = tables = tied_copy = 0
    shapes = []
    for param in model.parameters():
        if is_stem_table(param):
            tables += param.numel()
            shapes.append((param.shape[0], param.shape[1]))
        else:
            dense += param.numel()
            if get_tp_shard(param) is None:
                replicated += param.numel()
            if is_tied_copy(param):
                tied_copy += param.numel()
    return ShardParams(dense, replicated, tables, tuple(shapes), tied_copy)


def layer_activation_bytes(m: ModelConfig, tp_size: int, micro_batch_size: int,
                           bytes_per_element: int) -> float:
    """Activations one transformer layer leaves for the backward per micro-batch on one rank,
    no recomputation.

    Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
    (arXiv 2205.05198, Sec. 4.1-4.2) count s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes per GPT layer
    under TP t without sequence parallelism (fp16, LayerNorm, GeLU MLP of 4h, dropout). Adapted
    to this model, in elements per token at e bytes each (e = 2 under bf16 autocast, else 4):
      replicated on every TP rank: the inputs of the two RMSNorms and of linear_qkv and
        linear_fc1                                                          4h
      split by TP: q, k, v and the attention output kept by a fused attention kernel (SDPA's
        flash / memory-efficient backends store no s x s scores, so the 5as/h term is gone;
        GQA shrinks k, v to g/a of h) and the linear_proj input             h(3 + 2g/a) / t
      split by TP: gate pre-activation, up-projection output (dense) or looked-up table rows
        (STEM), SiLU output, and the product fed to linear_fc2 (no dropout)  4f / t
    """
    h, f = m.hidden_size, m.ffn_hidden_size
    gqa = m.num_query_groups / m.num_attention_heads
    per_token = 4 * h + (h * (3 + 2 * gqa) + 4 * f) / tp_size
    return per_token * bytes_per_element * m.seq_length * micro_batch_size


def head_activation_bytes(m: ModelConfig, padded_vocab: int, tp_size: int,
                          micro_batch_size: int, bytes_per_element: int) -> float:
    """What the last stage adds per micro-batch: the final norm and head inputs (2h) and the
    fp32 softmax that vocab_parallel_cross_entropy keeps (4 bytes x padded_vocab / t a token)."""
    per_token = 2 * m.hidden_size * bytes_per_element + FP32 * padded_vocab / tp_size
    return per_token * m.seq_length * micro_batch_size


def chunk_passes_in_flight(pp_rank: int, pp_size: int, vp_size: int,
                           num_microbatches: int) -> int:
    """Forward passes of a model chunk whose activations pipeline rank `pp_rank` holds at once,
    at its peak (the end of its warmup): megatron-core's warmup count
    (schedules.get_pp_rank_microbatches) plus the first steady-state forward, capped at all
    of them. 1F1B: pp - r - 1 warmup forwards, so pp - r micro-batches in flight. Interleaved
    (v chunks per rank): 2(pp - r - 1) + (v - 1) pp warmup forwards of chunks of L / (pp v)
    layers; on rank 0 that is (pp(v + 1) - 1) L / (pp v) = L (1 + (pp - 1) / (pp v)) layers'
    activations, Korthikanti et al.'s and Megatron's (theoretical_memory_usage.py)
    interleaved-schedule factor 1 + (p - 1) / (p m) over one stage's pp micro-batches of L/pp
    layers. No pipelining (pp = 1): one micro-batch at a time."""
    total = num_microbatches * vp_size
    if pp_size == 1:
        return min(1, total)
    warmup = pp_size - pp_rank - 1
    if vp_size > 1:
        warmup = 2 * (pp_size - pp_rank - 1) + (vp_size - 1) * pp_size
    return min(warmup + 1, total)


@dataclass(frozen=True)
class RankMemory:
    """Bytes of one rank, by where they live (`device_total`, `host_total`, `mmap_total`)."""

    dense_weights: int
    dense_grads: int
    dense_optimizer: int
    tables: TableMemory
    activations_per_pass: int  # one micro-batch through the rank's largest chunk
    passes_in_flight: int
    activations: int  # passes in flight x the largest chunk, + the head's once on the last rank

    @property
    def dense_total(self) -> int:
        return self.dense_weights + self.dense_grads + self.dense_optimizer

    @property
    def device_total(self) -> int:
        return self.dense_total + self.tables.device + self.activations

    @property
    def host_total(self) -> int:
        return self.tables.host

    @property
    def mmap_total(self) -> int:
        return self.tables.mmap


def estimate_rank_memory(shard: ShardParams, m: ModelConfig, *, chunk_layers: tuple[int, ...],
                         post_process: bool, padded_vocab: int, tp_size: int, pp_rank: int,
                         pp_size: int, vp_size: int, dp_size: int, micro_batch_size: int,
                         num_microbatches: int, bf16: bool,
                         tables: TableSetup) -> RankMemory:
    """`chunk_layers`: layers of each of the rank's model chunks; `post_process`: the rank
    holds the head (in its last chunk)."""
    grad_copies = 2 if dp_size > 1 else 1  # DDP's buckets hold a second copy of the grads
    e = 2 if bf16 else FP32
    per_pass = max(chunk_layers) * layer_activation_bytes(m, tp_size, micro_batch_size, e)
    head = head_activation_bytes(m, padded_vocab, tp_size, micro_batch_size, e) \
        if post_process else 0
    in_flight = chunk_passes_in_flight(pp_rank, pp_size, vp_size, num_microbatches)
    # The head's chunk runs its backward right after its forward on the last rank (it is the
    # end of the pipeline), so its extra activations are in flight once; every other pass is
    # counted at the largest chunk's size, an upper bound when layers split unevenly.
    return RankMemory(
        dense_weights=shard.dense * FP32,
        dense_grads=shard.dense * FP32 * grad_copies,
        dense_optimizer=shard.dense * 2 * FP32,
        tables=table_memory(shard.table_shapes, tables),
        activations_per_pass=int(per_pass + head),
        passes_in_flight=in_flight,
        activations=int(in_flight * per_pass + head))
