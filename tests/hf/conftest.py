"""Tiny randomly initialised transformers models saved locally (nothing is downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' init (norm weights away from 1 too), so a wrongly
    mapped or skipped tensor shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else 0.15 * noise)


@pytest.fixture
def hf_llama(small_corpus, tmp_path):
    """`hf_llama(tied=..., sharded=..., dtype=..., **config)`: (directory, model) of a tiny saved
    LlamaForCausalLM with the small corpus's tokenizer.json copied in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(tied: bool = False, name: str = "hf_llama", sharded: bool = False,
             dtype: torch.dtype = torch.float32, **overrides) -> tuple[Path, torch.nn.Module]:
        kwargs = dict(vocab_size=520, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      rope_theta=5000.0, rms_norm_eps=1e-2, tie_word_embeddings=tied,
                      eos_token_id=0, bos_token_id=None)
        kwargs.update(overrides)
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
        randomize(model, seed=3)
        model.eval()
        directory = tmp_path / name
        model.to(dtype).save_pretrained(directory, max_shard_size="20KB" if sharded else "5GB")
        if dtype != torch.float32:  # real Llama checkpoints are bf16: compare against the saved
            # values in fp32 (reloaded: a round trip of the model would also round RoPE buffers)
            model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        shutil.copyfile(small_corpus["tokenizer"], directory / "tokenizer.json")
        return directory, model

    return make
