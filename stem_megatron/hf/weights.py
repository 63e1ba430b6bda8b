"""Weight names and layouts: Hugging Face Llama <-> our megatron-core names.

Per layer N (HF `model.layers.N.` / ours `decoder.layers.N.`):

    self_attn.{q,k,v}_proj        self_attention.linear_qkv   q, k, v interleaved per KV group:
                                                              [group][q heads of it, k, v][head_dim]
    self_attn.o_proj              self_attention.linear_proj
    input_layernorm               input_layernorm
    post_attention_layernorm      pre_mlp_layernorm
    mlp.{gate,up}_proj            mlp.linear_fc1              dense layers: [gate; up]
    mlp.gate_proj                 mlp.linear_fc1              STEM layers: gate only
    mlp.stem_table                mlp.stem_table              STEM layers (our HF modeling file)
    mlp.down_proj                 mlp.linear_fc2

plus embed_tokens <-> embedding.word_embeddings, norm <-> decoder.final_layernorm and
lm_head <-> output_layer (absent when tied). HF Llama stores q/k in the rotate-half RoPE
convention, which is ours, so no head permutation is needed. Our embedding and head have
`padded_vocab_size` rows; HF has exactly the vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stem_megatron.config import ModelConfig

# Same tensor under both names (relative to the layer prefix).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}


def _qkv_shape(m: ModelConfig) -> tuple[int, int, int, int]:
    head_dim = m.hidden_size // m.num_attention_heads
    return (
        m.num_query_groups,
        m.num_attention_heads // m.num_query_groups,
        head_dim,
        m.hidden_size,
    )


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    groups, per_group, head_dim, hidden = _qkv_shape(m)
    return torch.cat(
        [
            q.reshape(groups, per_group, head_dim, hidden),
            k.reshape(groups, 1, head_dim, hidden),
            v.reshape(groups, 1, head_dim, hidden),
        ],
        dim=1,
    ).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, per_group, head_dim, hidden = _qkv_shape(m)
    parts = qkv.reshape(groups, per_group + 2, head_dim, hidden)
    return (
        parts[:, :per_group].reshape(-1, hidden),
        parts[:, per_group].reshape(-1, hidden),
        parts[:, per_group + 1].reshape(-1, hidden),
    )


def llama_names(m: ModelConfig, tied: bool) -> list[str]:
    """Every tensor name an HF LlamaForCausalLM directory of this model holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not tied:
        names.append("lm_head.weight")
    for n in range(m.num_layers):
        names += [
            f"model.layers.{n}.{name}"
            for name in [
                *_LAYER_RENAMES,
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
            ]
        ]
    return names


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Vocab padding rows are zero: their logits are 0 and they embed to nothing."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])]) if rows > t.shape[0] else t


def megatron_from_hf(
    read: Callable[[str], torch.Tensor], m: ModelConfig, padded_vocab: int
) -> dict[str, torch.Tensor]:
    """Our weights of the dense model (single-process layout, every fc1 [gate; up]) from HF
    tensors; `read(name)` returns an HF tensor."""
    out = {
        "embedding.word_embeddings.weight": _pad_rows(
            read("model.embed_tokens.weight"), padded_vocab
        ),
        "decoder.final_layernorm.weight": read("model.norm.weight"),
    }
    if m.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = _pad_rows(read("lm_head.weight"), padded_vocab)
    for n in range(m.num_layers):
        hf, ours = f"model.layers.{n}.", f"decoder.layers.{n}."
        for hf_name, our_name in _LAYER_RENAMES.items():
            out[ours + our_name] = read(hf + hf_name)
        out[ours + "self_attention.linear_qkv.weight"] = fuse_qkv(
            *(read(f"{hf}self_attn.{x}_proj.weight") for x in "qkv"), m
        )
        out[ours + "mlp.linear_fc1.weight"] = torch.cat(
            [read(hf + "mlp.gate_proj.weight"), read(hf + "mlp.up_proj.weight")]
        )
    return out


def drop_up_projection(
    dense: dict[str, torch.Tensor], stem_layers: set[int], ffn_hidden_size: int
) -> dict[str, torch.Tensor]:
    """The dense weights for a STEM model: in STEM layers fc1 keeps only the gate (the table
    replaces the up-projection). Tables are not produced here."""
    out = dict(dense)
    for n in stem_layers:
        name = f"decoder.layers.{n}.mlp.linear_fc1.weight"
        out[name] = dense[name][:ffn_hidden_size]
    return out


def hf_from_megatron(
    state: dict[str, torch.Tensor], m: ModelConfig, vocab_size: int, stem_layers: set[int]
) -> dict[str, torch.Tensor]:
    """HF tensors (contiguous, unshared, as safetensors needs) from our single-process model's
    state dict; padding rows of the vocab are dropped. Tables are returned uncopied."""
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_size],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    if m.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    for n in range(m.num_layers):
        hf, ours = f"model.layers.{n}.", f"decoder.layers.{n}."
        for hf_name, our_name in _LAYER_RENAMES.items():
            out[hf + hf_name] = state[ours + our_name]
        q, k, v = split_qkv(state[ours + "self_attention.linear_qkv.weight"], m)
        out.update(
            {
                hf + "self_attn.q_proj.weight": q,
                hf + "self_attn.k_proj.weight": k,
                hf + "self_attn.v_proj.weight": v,
            }
        )
        fc1 = state[ours + "mlp.linear_fc1.weight"]
        if n in stem_layers:
            out[hf + "mlp.gate_proj.weight"] = fc1
            out[hf + "mlp.stem_table.weight"] = state[ours + "mlp.stem_table.weight"]
        else:
            gate, up = fc1.chunk(2)
            out.update({hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up})
    # safetensors refuses tensors sharing storage (gate/up are halves of fc1, q/k/v of qkv):
    # copy those; tables, the bulk of a STEM model, stand alone and are written uncopied.
    return {
        name: t.detach().float().contiguous()
        if name.endswith("stem_table.weight")
        else t.detach().float().contiguous().clone()
        for name, t in out.items()
    }
