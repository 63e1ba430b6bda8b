"""llama3 RoPE scaling (Llama 3.1/3.2): our frequencies equal transformers', an imported
llama3 model gives transformers' logits, exports apply the scaling in transformers (dense
LlamaForCausalLM and our STEM modeling file), the model equals the plain reference with the
scaling on, and other scaling types or bad values are refused by name."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.config import ConfigError, ModelConfig, RopeScalingConfig
from stem_megatron.config_loader import load_config
from stem_megatron.hf.exporter import export_checkpoint
from stem_megatron.hf.importer import import_llama
from stem_megatron.hf.llama_config import HFFormatError
from stem_megatron.model.reference import ReferenceGPT
from stem_megatron.model.rope import inverse_frequencies
from stem_megatron.model.transformer import ModelSpec, StemGPTModel

VOCAB, SEQ, ORIGINAL, THETA = 520, 48, 32, 5000.0
# head_dim 16 and theta 5000: with the original context of 32 tokens the 8 frequencies make
# 5.1, 1.8, 0.6, ... turns, so one is kept, one blended and six divided by the factor.
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": ORIGINAL,
}
SCALING = RopeScalingConfig(
    type="llama3",
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=ORIGINAL,
)
MODEL = dict(
    hidden_size=64,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ,
    rope_theta=THETA,
)


@pytest.fixture
def llama3(hf_llama):
    """A tiny saved LlamaForCausalLM with llama3 RoPE scaling, and the model."""
    # rope_scaling: read by transformers 4 and 5 (5 adds rope_theta to the dict it is given)
    return hf_llama(name="llama3", rope_scaling=dict(LLAMA3), **MODEL)


def logit_diff(ours: torch.nn.Module, theirs: torch.nn.Module, what: str) -> float:
    """Max abs difference over full-length sequences (positions past the original context)."""
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mine = ours(ids)[..., :VOCAB]
        diff = (mine - theirs(ids).logits).abs().max().item()
    print(f"{what}: max abs logit diff {diff:.3g}, max |logit| {mine.abs().max().item():.3g}")
    assert mine.abs().max() > 1.0  # weights far from init: a wrong RoPE would show
    return diff


def test_frequencies_equal_transformers_and_cover_all_three_bands(llama3):
    _, hf_model = llama3
    theirs = hf_model.model.rotary_emb.inv_freq.double()
    ours = inverse_frequencies(16, THETA, SCALING)
    plain = inverse_frequencies(16, THETA, RopeScalingConfig())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    turns = ORIGINAL * plain / (2 * math.pi)
    kept, low = turns >= 4.0, turns <= 1.0
    blended = ~kept & ~low
    assert kept.any() and low.any() and blended.any()
    assert torch.equal(ours[kept], plain[kept])
    torch.testing.assert_close(ours[low], plain[low] / 4.0, rtol=1e-15, atol=0)
    assert ((ours[blended] < plain[blended]) & (ours[blended] > plain[blended] / 4.0)).all()


def test_llama_3_2_1b_shaped_config_maps_with_transformers_frequencies():
    """The RoPE and shape fields of Llama-3.2-1B's config.json (hub format: `rope_scaling`
    and a top-level `rope_theta`); no weights needed."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from stem_megatron.hf.llama_config import model_config_from_hf

    scaling = {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    }
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": scaling,
        "tie_word_embeddings": True,
        "vocab_size": 128256,
    }
    m = model_config_from_hf(cfg, "Llama-3.2-1B")
    assert m.rope_theta == 500000.0 and m.rope_scaling == RopeScalingConfig(
        type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    theirs = LlamaRotaryEmbedding(config=LlamaConfig(**cfg)).inv_freq.double()
    ours = inverse_frequencies(64, m.rope_theta, m.rope_scaling)
    plain = inverse_frequencies(64, m.rope_theta, RopeScalingConfig())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    changed = ~torch.isclose(ours, plain, rtol=1e-9, atol=0)
    assert 0 < int(changed.sum()) < 32  # the slow frequencies are stretched, the fast kept


@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
def test_import_matches_transformers_logits(llama3, parallel, tmp_path, layout):
    hf_dir, hf_model = llama3
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.pop("rope_scaling", None)
    spelling = {
        "rope_parameters": {"rope_parameters": {**LLAMA3, "rope_theta": THETA}},
        # as Llama 3.x config.json files on the hub (and transformers 4) write it
        "rope_scaling": {"rope_theta": THETA, "rope_scaling": LLAMA3},
    }[layout]
    (hf_dir / "config.json").write_text(json.dumps({**config, **spelling}))
    out = import_llama(hf_dir, tmp_path / "imported", ["stem.enabled=false"], log=lambda _: None)
    loaded = load_for_inference(str(out / "checkpoints"))
    assert loaded.config.model.rope_scaling == SCALING
    assert load_config(out / "config.yaml").model.rope_scaling == SCALING
    assert logit_diff(loaded.model, hf_model, f"llama3 import ({layout})") < 1e-5


@pytest.mark.parametrize("stem", [False, True])
def test_export_applies_llama3_in_transformers(llama3, parallel, tmp_path, stem):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    hf_dir, _ = llama3
    overrides = ["stem.layers=[1,2]"] if stem else ["stem.enabled=false"]
    imported = import_llama(hf_dir, tmp_path / "imported", overrides, log=lambda _: None)
    out = export_checkpoint(str(imported / "checkpoints"), tmp_path / "hf", log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] == LLAMA3
    assert config["rope_parameters"] == {**LLAMA3, "rope_theta": THETA}
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=stem).eval()
    assert (type(hf) is LlamaForCausalLM) is not stem
    torch.testing.assert_close(
        hf.model.rotary_emb.inv_freq.double(),
        inverse_frequencies(16, THETA, SCALING),
        rtol=1e-6,
        atol=0,
    )
    ours = load_for_inference(str(imported / "checkpoints")).model
    assert logit_diff(ours, hf, f"llama3 export stem={stem}") < 1e-5


def test_model_matches_reference_with_llama3(parallel):
    m = ModelConfig(
        num_layers=3,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=SEQ,
        make_vocab_size_divisible_by=64,
        rope_theta=THETA,
        rope_scaling=SCALING,
    )
    model = StemGPTModel(ModelSpec(model=m, vocab_size=100, stem_layers=(1,)))
    model.init_parameters(11)
    plain = StemGPTModel(
        ModelSpec(
            model=ModelConfig(**{**m.__dict__, "rope_scaling": RopeScalingConfig()}),
            vocab_size=100,
            stem_layers=(1,),
        )
    )
    assert not torch.allclose(model.rope_cos, plain.rope_cos, atol=1e-3)  # scaling is on
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    ids = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(ids) - ReferenceGPT(m, (1,), state).logits(ids)).abs().max().item()
    print(f"llama3 model vs reference: max abs logit diff {diff:.3g}")
    assert diff < 1e-6


def test_other_scaling_types_and_bad_values_are_refused(hf_llama, parallel, tmp_path):
    hf_dir, _ = hf_llama(**MODEL)
    config = json.loads((hf_dir / "config.json").read_text())
    bad = {
        "RoPE scaling 'yarn' is not supported.*'llama3'": {"rope_type": "yarn", "factor": 2.0},
        "'linear' is not supported": {"type": "linear", "factor": 2.0},
        "factor must be positive, got 0.0": {**LLAMA3, "factor": 0},
        "needs numbers for low_freq_factor": {**LLAMA3, "low_freq_factor": None},
        "high_freq_factor .* greater than": {**LLAMA3, "high_freq_factor": 0.5},
    }
    for message, scaling in bad.items():
        (hf_dir / "config.json").write_text(json.dumps({**config, "rope_scaling": scaling}))
        with pytest.raises(HFFormatError, match=f"config.json: .*{message}"):
            import_llama(hf_dir, tmp_path / "out", log=lambda _: None)
    (hf_dir / "config.json").write_text(json.dumps({**config, "rope_scaling": LLAMA3}))
    with pytest.raises(ConfigError, match="model.rope_scaling cannot be overridden"):
        import_llama(hf_dir, tmp_path / "out", ["model.rope_scaling.factor=8"], log=lambda _: None)
    assert not (tmp_path / "out").exists()

    llama3 = [
        f"model.rope_scaling.{k}={v}"
        for k, v in {**LLAMA3, "type": "llama3"}.items()
        if k != "rope_type"
    ]
    for overrides, message in [
        (["model.rope_scaling.type=yarn"], "type must be one of 'none', 'llama3', got 'yarn'"),
        ([*llama3, "model.rope_scaling.factor=-1"], "factor must be positive, got -1.0"),
        ([*llama3, "model.rope_scaling.factor=0"], "factor must be positive, got 0.0"),
        (["model.rope_scaling.type=llama3"], "factor must be set"),
        (["model.rope_scaling.factor=8"], "factor given but .*type is 'none'"),
    ]:
        with pytest.raises(ConfigError, match=f"model.rope_scaling.{message}"):
            load_config(None, overrides)
    assert load_config(None, llama3).model.rope_scaling == SCALING
