"""A STEM Llama for Hugging Face `transformers`: the modeling file our export writes.

This module is copied as is into every exported STEM model directory and named by the
`auto_map` of its config.json, so that

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

builds the model without stem_megatron installed. It may therefore import only torch and
transformers, and it works with transformers 4.45.2 to 5.x (stem_megatron tests both ends).
So it uses only the parts of transformers whose interface stayed put over that range: the
config, the pretrained-model base, RMSNorm, the SwiGLU MLP, RoPE (including llama3 scaling
read from config.json), a KV cache's `update` / `get_seq_length`, and Llama's preparation
of generate()'s inputs. Attention is written here. The cache arrives as `past_key_values`
(transformers 4.x) or `cache` (5.x) and is returned under the name generate() reads back.

The model is Llama, except that in the layers listed by `config.stem_layers` the FFN
up-projection is a per-layer table row picked by the token id at that position (STEM,
arXiv 2601.10639):

    y = down_proj( SiLU(gate_proj(x)) * stem_table[token] )

Every STEM layer needs the token ids, so the model takes `input_ids` (not `inputs_embeds`)
and hands them to each layer. During cached generation `input_ids` holds only the new
tokens, which are exactly the positions being computed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaMLP,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

# The name under which this transformers' generate() passes the KV cache and reads it back
# from the output: `cache` from 5.x on, `past_key_values` before.
CACHE_NAME = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    else "past_key_values"
)


class StemLlamaConfig(LlamaConfig):
    """LlamaConfig plus `stem_layers`: the indices of the layers with a STEM FFN."""

    model_type = "stem_llama"

    def __init__(self, stem_layers: list[int] | None = None, **kwargs):
        self.stem_layers = list(stem_layers or [])
        super().__init__(**kwargs)


class StemLlamaMLP(nn.Module):
    """SwiGLU with the up-projection replaced by a [vocab, intermediate] table lookup."""

    def __init__(self, config: StemLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.stem_table = nn.Embedding(config.vocab_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.stem_table(token_ids).to(x.dtype)
        return self.down_proj(F.silu(self.gate_proj(x)) * rows)


class StemLlamaAttention(nn.Module):
    """Llama's grouped-query attention (same parameter names), with the KV cache."""

    def __init__(self, config: StemLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, cache
    ) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(proj: nn.Linear, n: int) -> torch.Tensor:
            return proj(x).view(batch, length, n, self.head_dim).transpose(1, 2)

        q, k = apply_rotary_pos_emb(
            heads(self.q_proj, self.heads), heads(self.k_proj, self.kv_heads), *rope
        )
        v = heads(self.v_proj, self.kv_heads)
        if cache is not None:  # k, v become those of every position so far
            k, v = cache.update(k, v, self.layer_idx)
        group = self.heads // self.kv_heads
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), attn_mask=mask
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class StemLlamaDecoderLayer(nn.Module):
    """A Llama decoder layer whose FFN also receives the token ids (used by STEM layers)."""

    def __init__(self, config: StemLlamaConfig, layer_idx: int):
        super().__init__()
        self.is_stem = layer_idx in config.stem_layers
        self.self_attn = StemLlamaAttention(config, layer_idx)
        self.mlp = StemLlamaMLP(config) if self.is_stem else LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor, rope, mask, cache):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, mask, cache)
        normed = self.post_attention_layernorm(hidden)
        return hidden + (self.mlp(normed, token_ids) if self.is_stem else self.mlp(normed))


def attention_mask_4d(
    padding: torch.Tensor | None, batch: int, length: int, past: int, device: torch.device
) -> torch.Tensor:
    """[batch, 1, length, past + length] booleans, True where a query may attend: causal over
    absolute positions, minus keys that `padding` ([batch, past + length], 0 = pad) drops.
    A query always sees itself, so a padded query's row is never empty (SDPA would give NaN)."""
    keys = torch.arange(past + length, device=device)
    queries = past + torch.arange(length, device=device)
    causal = keys[None, :] <= queries[:, None]
    if padding is None:
        return causal.expand(batch, 1, length, past + length)
    keep = padding.bool()[:, None, None, :] | (keys[None, :] == queries[:, None])
    return causal & keep


class StemLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = StemLlamaConfig
    config: StemLlamaConfig
    _no_split_modules = ["StemLlamaDecoderLayer"]
    _supports_static_cache = False  # the attention appends to a dynamic cache only


class StemLlamaModel(StemLlamaPreTrainedModel):
    def __init__(self, config: StemLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [StemLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache,
    ) -> torch.Tensor:
        """The final hidden states of `input_ids`, the tokens after the `cache`'s (if any)."""
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask_4d(attention_mask, batch, length, past, input_ids.device)
        elif attention_mask is None:
            mask = attention_mask_4d(None, batch, length, past, input_ids.device)
        else:  # a 4D mask prepared by the caller
            mask = attention_mask
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:  # left padding
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = (past + torch.arange(length, device=input_ids.device))[None]
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, input_ids, rope, mask, cache)
        return self.norm(hidden)


class StemLlamaForCausalLM(StemLlamaPreTrainedModel, GenerationMixin):
    """A causal LM head and loss over a StemLlamaModel; generate() prepares its inputs as it
    does for LlamaForCausalLM in the installed transformers."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    prepare_inputs_for_generation = LlamaForCausalLM.prepare_inputs_for_generation

    def __init__(self, config: StemLlamaConfig):
        super().__init__(config)
        self.model = StemLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the mean next-token loss given `labels`, -100 = ignore). The KV cache
        comes as `past_key_values` or `cache` (whichever this transformers passes); other
        keyword arguments of generate (cache_position, return_dict, ...) are not needed."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError(
                "STEM layers look rows up by token id: pass input_ids "
                "(inputs_embeds cannot be used with this model)"
            )
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_NAME: cache if use_cache else None}
        )
