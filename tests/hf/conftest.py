"""Tiny randomly initialised transformers models saved locally (nothing is downloaded), and a
trained STEM model exported for transformers."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported
import transformers  # noqa: E402

# from_pretrained's dtype argument: `dtype` in transformers 5, `torch_dtype` before (4.45)
DTYPE_ARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


@dataclass(frozen=True)
class StemExport:
    run: Path  # our run directory (config and checkpoints)
    hf_dir: Path  # its export, loaded by transformers with trust_remote_code=True


@pytest.fixture(scope="session")
def trained_stem_export(trained_stem_run, tmp_path_factory) -> StemExport:
    """The export of `trained_stem_run` (tests/conftest.py: 150 steps, greedy text that varies
    from token to token, so STEM rows looked up with a wrong id change the scores)."""
    from stem_megatron.hf.exporter import export_checkpoint
    from stem_megatron.parallel.state import ParallelState

    out = tmp_path_factory.mktemp("stem_export") / "hf"
    parallel = ParallelState.initialize()
    try:
        export_checkpoint(str(trained_stem_run), out, log=lambda _: None)
    finally:
        parallel.destroy()
    return StemExport(run=trained_stem_run, hf_dir=out)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' init (norm weights away from 1 too), so a wrongly
    mapped or skipped tensor shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else 0.15 * noise)


@pytest.fixture
def hf_llama(small_corpus, tmp_path):
    """`hf_llama(tied=..., sharded=..., dtype=..., **config)`: (directory, model) of a tiny saved
    LlamaForCausalLM with the small corpus's tokenizer.json copied in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(
        tied: bool = False,
        name: str = "hf_llama",
        sharded: bool = False,
        dtype: torch.dtype = torch.float32,
        **overrides,
    ) -> tuple[Path, torch.nn.Module]:
        kwargs = dict(
            vocab_size=520,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            rope_theta=5000.0,
            rms_norm_eps=1e-2,
            tie_word_embeddings=tied,
            eos_token_id=0,
            bos_token_id=None,
        )
        kwargs.update(overrides)
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
        randomize(model, seed=3)
        model.eval()
        directory = tmp_path / name
        model.to(dtype).save_pretrained(directory, max_shard_size="20KB" if sharded else "5GB")
        if dtype != torch.float32:  # real Llama checkpoints are bf16: compare against the saved
            # values in fp32 (reloaded: a round trip of the model would also round RoPE buffers)
            model = LlamaForCausalLM.from_pretrained(directory, **{DTYPE_ARG: torch.float32}).eval()
        shutil.copyfile(small_corpus["tokenizer"], directory / "tokenizer.json")
        return directory, model

    return make
