"""A plain single-process reference of the model's math, with no megatron-core and no
parallelism. Only tests use it: they check the parallel model, generation, knowledge edits
and llama3 RoPE scaling against it. It reads the full (unsharded) state dict under the same
parameter names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stem_megatron.config import ModelConfig
from stem_megatron.model.rope import inverse_frequencies


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, position: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """x: [b, heads, s, d]; rotate-half RoPE at the given positions."""
    d = x.shape[-1]
    inv_freq = inverse_frequencies(d, m.rope_theta, m.rope_scaling)
    angles = torch.outer(position.double(), inv_freq)
    cos = torch.cat([angles, angles], -1).cos().float()
    sin = torch.cat([angles, angles], -1).sin().float()
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return x * cos + rotated * sin


class ReferenceGPT:
    """Reference forward: `logits(input_ids)` -> [b, s, padded_vocab]. Differentiable when the
    given weights require grad (tests compare gradients), so wrap calls in no_grad otherwise."""

    def __init__(
        self,
        model: ModelConfig,
        stem_layers: list[int] | tuple[int, ...],
        state_dict: dict[str, torch.Tensor],
    ):
        self.m = model
        self.stem_layers = set(stem_layers)
        # megatron-core layers add `_extra_state` entries (None) to state dicts: skip them.
        self.w = {
            k: v if v.dtype == torch.float32 else v.float()
            for k, v in state_dict.items()
            if isinstance(v, torch.Tensor)
        }

    def _attention(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        m, b, s = self.m, x.shape[0], x.shape[1]
        d = m.hidden_size // m.num_attention_heads
        per_group = m.num_attention_heads // m.num_query_groups
        qkv = F.linear(x, self.w[prefix + "linear_qkv.weight"])
        qkv = qkv.view(b, s, m.num_query_groups, per_group + 2, d)
        q = qkv[:, :, :, :per_group].reshape(b, s, m.num_attention_heads, d).transpose(1, 2)
        k = qkv[:, :, :, per_group].transpose(1, 2)
        v = qkv[:, :, :, per_group + 1].transpose(1, 2)
        k = k.repeat_interleave(per_group, dim=1)  # each KV head serves its group's q heads
        v = v.repeat_interleave(per_group, dim=1)
        pos = torch.arange(s)
        q, k = _rotate(q, pos, m), _rotate(k, pos, m)
        scores = (q @ k.transpose(-1, -2)) / d**0.5
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
        return F.linear(out, self.w[prefix + "linear_proj.weight"])

    def _mlp(self, x: torch.Tensor, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        prefix = f"decoder.layers.{layer}.mlp."
        fc1 = F.linear(x, self.w[prefix + "linear_fc1.weight"])
        if layer in self.stem_layers:
            up = self.w[prefix + "stem_table.weight"][input_ids]
            gate = fc1
        else:
            gate, up = fc1.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w[prefix + "linear_fc2.weight"])

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        m, eps = self.m, self.m.norm_epsilon
        x = self.w["embedding.word_embeddings.weight"][input_ids]
        for layer in range(m.num_layers):
            p = f"decoder.layers.{layer}."
            x = x + self._attention(
                _rms_norm(x, self.w[p + "input_layernorm.weight"], eps), p + "self_attention."
            )
            x = x + self._mlp(
                _rms_norm(x, self.w[p + "pre_mlp_layernorm.weight"], eps), input_ids, layer
            )
        x = _rms_norm(x, self.w["decoder.final_layernorm.weight"], eps)
        head = self.w.get("output_layer.weight", self.w["embedding.word_embeddings.weight"])
        return F.linear(x, head)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [b, s]."""
        logits = self.logits(input_ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(
            labels
        )
