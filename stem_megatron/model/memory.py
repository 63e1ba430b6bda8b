"""Memory one rank needs to train its shard of the model: weights, gradients, optimizer states,
STEM tables with their optimizer state, and activations. Parameter counts are read off a built
shard (the dry run builds it on the meta device), so they are those of the real model code.

What is stored today (see training/optimizer.py, parallel/data_parallel.py, stem/):
- dense parameters in fp32 (train.bf16 is autocast only: no bf16 copy, no master weights);
  fp32 gradients, plus torch DDP's bucket copy of them when DP > 1 (gradient_as_bucket_view is
  off); AdamW's exp_avg and exp_avg_sq in fp32. With bf16 parameters and fp32 master weights
  (Megatron's mixed precision) dense weights would take 2 + 4 bytes per parameter instead of 4.
- STEM tables in fp32 with SparseRowAdamW's exp_avg and exp_avg_sq in fp32 (plus one int64
  "last settled step" per row in `exact` mode), all on the `device` tier. Table gradients are
  row-sparse: at most min(vocab, tokens per step) rows of d_ff/TP, never a dense [V, d_ff].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stem_megatron.config import ModelConfig
from stem_megatron.model.sharding import get_tp_shard
from stem_megatron.stem.table import is_stem_table

FP32 = 4
INT64 = 8


@dataclass(frozen=True)
class ShardParams:
    dense: int  # parameter elements on this rank, tables excluded
    replicated: int  # of `dense`: held whole by every TP rank (the norms)
    tables: int
    table_shapes: tuple[tuple[int, int], ...]  # local [rows, columns] of each table


def count_shard(model: torch.nn.Module) -> ShardParams:
    dense = replicated = tables = 0
    shapes = []
    for param in model.parameters():
        if is_stem_table(param):
            tables += param.numel()
            shapes.append((param.shape[0], param.shape[1]))
        else:
            dense += param.numel()
            if get_tp_shard(param) is None:
                replicated += param.numel()
    return ShardParams(dense, replicated, tables, tuple(shapes))


def activation_bytes_per_microbatch(m: ModelConfig, num_layers: int, post_process: bool,
                                    padded_vocab: int, tp_size: int, micro_batch_size: int,
                                    bytes_per_element: int) -> int:
    """Activations one micro-batch leaves for the backward on one rank, no recomputation.

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
    The last stage adds the final norm and head inputs (2h) and the fp32 softmax that
    vocab_parallel_cross_entropy keeps (4 bytes x padded_vocab / t per token).
    """
    h, f, s = m.hidden_size, m.ffn_hidden_size, m.seq_length
    gqa = m.num_query_groups / m.num_attention_heads
    per_token_layer = 4 * h + (h * (3 + 2 * gqa) + 4 * f) / tp_size
    total = num_layers * per_token_layer * bytes_per_element
    if post_process:
        total += 2 * h * bytes_per_element + FP32 * padded_vocab / tp_size
    return int(total * s * micro_batch_size)


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one rank."""

    dense_weights: int
    dense_grads: int
    dense_optimizer: int
    tables: int
    table_optimizer: int
    table_row_grads: int  # worst case: min(vocab, tokens per step) rows per table
    activations_per_microbatch: int
    microbatches_in_flight: int  # 1F1B keeps pp - stage micro-batches' activations on a stage

    @property
    def activations(self) -> int:
        return self.activations_per_microbatch * self.microbatches_in_flight

    @property
    def dense_total(self) -> int:
        return self.dense_weights + self.dense_grads + self.dense_optimizer

    @property
    def table_total(self) -> int:
        return self.tables + self.table_optimizer + self.table_row_grads

    @property
    def total(self) -> int:
        return self.dense_total + self.table_total + self.activations


def estimate_rank_memory(shard: ShardParams, m: ModelConfig, *, num_layers: int,
                         post_process: bool, padded_vocab: int, tp_size: int, pp_size: int,
                         dp_size: int, stage: int, micro_batch_size: int,
                         global_batch_size: int, bf16: bool, table_mode: str) -> RankMemory:
    num_microbatches = global_batch_size // (micro_batch_size * dp_size)
    grad_copies = 2 if dp_size > 1 else 1  # DDP's buckets hold a second copy of the grads
    tokens_per_step = global_batch_size * m.seq_length  # the union of rows over DP replicas
    row_grads = sum(min(rows, tokens_per_step) * cols for rows, cols in shard.table_shapes)
    settled = sum(rows for rows, _ in shard.table_shapes) * INT64 if table_mode == "exact" else 0
    return RankMemory(
        dense_weights=shard.dense * FP32,
        dense_grads=shard.dense * FP32 * grad_copies,
        dense_optimizer=shard.dense * 2 * FP32,
        tables=shard.tables * FP32,
        table_optimizer=shard.tables * 2 * FP32 + settled,
        table_row_grads=row_grads * FP32,
        activations_per_microbatch=activation_bytes_per_microbatch(
            m, num_layers, post_process, padded_vocab, tp_size, micro_batch_size,
            2 if bf16 else FP32),
        microbatches_in_flight=min(pp_size - stage, num_microbatches),
    )
