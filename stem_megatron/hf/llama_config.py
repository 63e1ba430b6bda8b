"""Hugging Face Llama `config.json` <-> our `ModelConfig`.

Our model is exactly Llama's math (RMSNorm, rotate-half RoPE, GQA, SwiGLU, no biases, plain
or llama3-scaled RoPE), so a Llama config maps field by field. Anything else (another
architecture, biases, another RoPE scaling, a head size other than hidden/heads) is refused
by name rather than imported into a model that would compute something different.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stem_megatron.config import ModelConfig, RopeScalingConfig
from stem_megatron.config_validation import validate_rope_scaling

LLAMA_ARCHITECTURE = "LlamaForCausalLM"
STEM_ARCHITECTURE = "StemLlamaForCausalLM"
STEM_MODEL_TYPE = "stem_llama"
MODELING_MODULE = "modeling_stem_llama"  # the file the STEM export writes beside config.json


class HFFormatError(ValueError):
    """An HF directory is missing, incomplete, or holds a model we cannot import."""


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    if not hf_dir.exists():
        raise HFFormatError(f"Hugging Face model directory {hf_dir} does not exist")
    if not hf_dir.is_dir():
        raise HFFormatError(
            f"{hf_dir} is not a directory: pass the model directory that "
            f"holds config.json and the safetensors weights"
        )
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFFormatError(
            f"{hf_dir} has no config.json: it is not a Hugging Face model "
            f"directory (save one with model.save_pretrained(dir))"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HFFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise HFFormatError(f"{path} must hold a JSON object")
    return config


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings as transformers 5 reads them: the older `rope_scaling` (how Llama 3.x
    config.json files on the hub are written) if present, else `rope_parameters`; rope_theta
    from that dict, else the top-level key."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _rope_scaling(params: dict[str, Any], where: str) -> RopeScalingConfig:
    """Our RopeScalingConfig; HFFormatError for a type we do not implement or bad values."""
    rope_type = params["rope_type"]
    if rope_type == "default":
        return RopeScalingConfig()
    if rope_type != "llama3":
        raise HFFormatError(
            f"{where}: RoPE scaling '{rope_type}' is not supported: our model "
            f"implements rope_type 'default' (plain) and 'llama3'"
        )
    missing = [key for key in LLAMA3_KEYS if not isinstance(params.get(key), (int, float))]
    if missing:
        raise HFFormatError(
            f"{where}: llama3 RoPE scaling needs numbers for "
            f"{', '.join(missing)}, got {[params.get(k) for k in missing]}"
        )
    scaling = RopeScalingConfig(
        type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise HFFormatError(f"{where}: llama3 RoPE scaling: {message}")

    validate_rope_scaling(scaling, require)
    return scaling


def _hf_rope_scaling(m: ModelConfig) -> dict[str, Any]:
    """The export's `rope_scaling` keys: those transformers' llama3 RoPE reads."""
    r = m.rope_scaling
    return {
        "rope_type": r.type,
        "factor": r.factor,
        "low_freq_factor": r.low_freq_factor,
        "high_freq_factor": r.high_freq_factor,
        "original_max_position_embeddings": r.original_max_position_embeddings,
    }


def unpadded_divisor(vocab_size: int, limit: int = 128) -> int:
    """The largest power of two <= limit dividing vocab_size: embedding and head then need
    no padding rows, so the softmax is over exactly the HF vocab."""
    divisor = 1
    while divisor * 2 <= limit and vocab_size % (divisor * 2) == 0:
        divisor *= 2
    return divisor


def model_config_from_hf(cfg: dict[str, Any], where: str) -> ModelConfig:
    """Our ModelConfig for an HF Llama config; HFFormatError naming anything not Llama."""
    model_type = cfg.get("model_type")
    architectures = cfg.get("architectures") or []
    if model_type != "llama" or any(a != LLAMA_ARCHITECTURE for a in architectures):
        named = ", ".join(architectures) or "unknown architecture"
        raise HFFormatError(
            f"{where}: {named} (model_type '{model_type}') is not supported: only Llama-format "
            f"models ({LLAMA_ARCHITECTURE}, model_type 'llama') can be imported"
        )
    unsupported = {
        "hidden_act": cfg.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(cfg.get("attention_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
    }
    bad = [f"{key}={cfg.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise HFFormatError(
            f"{where}: {', '.join(bad)} is not supported (our Llama has SiLU gating and no biases)"
        )
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise HFFormatError(
            f"{where}: head_dim {head_dim} x {heads} heads != hidden_size "
            f"{hidden}; our attention needs head_dim = hidden_size / heads"
        )
    vocab = int(cfg["vocab_size"])
    rope = _rope_parameters(cfg)
    return ModelConfig(
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        seq_length=int(cfg.get("max_position_embeddings", 2048)),
        vocab_size=vocab,
        make_vocab_size_divisible_by=unpadded_divisor(vocab),
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
        rope_theta=float(rope["rope_theta"]),
        rope_scaling=_rope_scaling(rope, where),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        init_method_std=float(cfg.get("initializer_range", 0.02)),
    )


# Fields of ModelConfig that the imported weights fix: overriding them is an error.
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "vocab_size",
    "untie_embeddings_and_output_weights",
    "rope_theta",
    "rope_scaling",
    "norm_epsilon",
)


def hf_config_from_model(
    m: ModelConfig, vocab_size: int, stem_layers: list[int], eos_token_id: int | None
) -> dict[str, Any]:
    """config.json for an export: LlamaForCausalLM, or our StemLlamaForCausalLM with STEM."""
    cfg: dict[str, Any] = {
        "architectures": [LLAMA_ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "initializer_range": m.init_method_std,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "dtype": "float32",
        "use_cache": True,
    }
    if m.rope_scaling.type != "none":  # both spellings: transformers 5 and 4.x readers
        cfg["rope_scaling"] = _hf_rope_scaling(m)
        cfg["rope_parameters"] = {**cfg["rope_scaling"], "rope_theta": m.rope_theta}
    if stem_layers:
        cfg.update(
            {
                "architectures": [STEM_ARCHITECTURE],
                "model_type": STEM_MODEL_TYPE,
                "stem_layers": list(stem_layers),
                "auto_map": {
                    "AutoConfig": f"{MODELING_MODULE}.StemLlamaConfig",
                    "AutoModelForCausalLM": f"{MODELING_MODULE}.{STEM_ARCHITECTURE}",
                },
            }
        )
    return cfg
