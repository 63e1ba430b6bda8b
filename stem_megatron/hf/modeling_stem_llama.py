"""A STEM Llama for Hugging Face `transformers`: the modeling file our export writes.

This module is copied as is into every exported STEM model directory and named by the
`auto_map` of its config.json, so that

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)

builds the model without stem_megatron installed. It may therefore import only torch and
transformers (written against transformers 5.x).

The model is Llama (attention, RMSNorm, RoPE and KV cache are transformers' own Llama
modules; RoPE scaling such as llama3 comes from config.json as for LlamaForCausalLM), except that in the layers listed by `config.stem_layers` the FFN up-projection is
a per-layer table row picked by the token id at that position (STEM, arXiv 2601.10639):

    y = down_proj( SiLU(gate_proj(x)) * stem_table[token] )

Every STEM layer needs the token ids, so the model takes `input_ids` (not `inputs_embeds`)
and hands them to each layer. During cached generation `input_ids` holds only the new
tokens, which are exactly the positions being computed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaForCausalLM,
                                                      LlamaMLP, LlamaPreTrainedModel,
                                                      LlamaRMSNorm, LlamaRotaryEmbedding)


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
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * rows)


class StemLlamaDecoderLayer(nn.Module):
    """A Llama decoder layer whose FFN also receives the token ids (used by STEM layers)."""

    def __init__(self, config: StemLlamaConfig, layer_idx: int):
        super().__init__()
        self.is_stem = layer_idx in config.stem_layers
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = StemLlamaMLP(config) if self.is_stem else LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, token_ids: torch.Tensor, **attention_kwargs):
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                     **attention_kwargs)
        hidden_states = hidden_states + attended
        normed = self.post_attention_layernorm(hidden_states)
        ffn = self.mlp(normed, token_ids) if self.is_stem else self.mlp(normed)
        return hidden_states + ffn


class StemLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = StemLlamaConfig
    config: StemLlamaConfig
    _no_split_modules = ["StemLlamaDecoderLayer"]


class StemLlamaModel(StemLlamaPreTrainedModel):
    def __init__(self, config: StemLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         config.pad_token_id)
        self.layers = nn.ModuleList([StemLlamaDecoderLayer(config, i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                past_key_values=None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if input_ids is None:
            raise ValueError("STEM layers look rows up by token id: pass input_ids "
                             "(inputs_embeds alone cannot be used with this model)")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(embeds.shape[1], device=embeds.device) + seen)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=embeds,
                                  attention_mask=attention_mask, past_key_values=past_key_values,
                                  position_ids=position_ids)
        rope = self.rotary_emb(embeds, position_ids=position_ids)
        hidden = embeds
        for layer in self.layers:
            hidden = layer(hidden, input_ids, attention_mask=mask, position_ids=position_ids,
                           past_key_values=past_key_values, use_cache=use_cache,
                           position_embeddings=rope, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       past_key_values=past_key_values)


class StemLlamaForCausalLM(StemLlamaPreTrainedModel, GenerationMixin):
    """Llama's causal-LM head and loss (LlamaForCausalLM.forward) over a StemLlamaModel."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    forward = LlamaForCausalLM.forward

    def __init__(self, config: StemLlamaConfig):
        super().__init__(config)
        self.model = StemLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
