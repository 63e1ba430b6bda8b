"""Parameter and FLOP counts that treat STEM tables honestly.

A STEM table holds V x d_ff parameters but a token reads one row of d_ff values and
multiplies nothing with the table, so:
- total parameters count every table element;
- active parameters count one row per table (what a token touches), plus everything dense;
- FLOPs per token count only matrix multiplies: 6 x (matmul weights) for forward and
  backward, plus 12 x layers x hidden x seq for attention scores (PaLM's accounting). The
  official STEM code counts tables as active and so overstates FLOPs and MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

from stem_megatron.config import ModelConfig
from stem_megatron.model.transformer import padded_vocab_size


@dataclass(frozen=True)
class ModelCounts:
    total_params: int
    active_params: int
    table_params: int
    matmul_params: int  # weights that multiply activations (embedding lookups excluded)
    flops_per_token: int  # forward + backward, one token


def count_model(
    model: ModelConfig, vocab_size: int, stem_layers: list[int] | tuple[int, ...]
) -> ModelCounts:
    h, f, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    head_dim = h // model.num_attention_heads
    vp = padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by)
    attention = h * (model.num_attention_heads + 2 * model.num_query_groups) * head_dim + h * h
    n_stem = len(stem_layers)
    dense_ffn, stem_ffn = 3 * h * f, 2 * h * f
    layers_matmul = attention * L + dense_ffn * (L - n_stem) + stem_ffn * n_stem
    norms = 2 * h * L + h
    embedding = vp * h
    head = vp * h
    table_params = n_stem * vocab_size * f
    untied = model.untie_embeddings_and_output_weights
    total = layers_matmul + norms + embedding + (head if untied else 0) + table_params
    active = total - table_params + n_stem * f
    matmul = layers_matmul + head
    flops = 6 * matmul + 12 * L * h * model.seq_length
    return ModelCounts(total, active, table_params, matmul, flops)
