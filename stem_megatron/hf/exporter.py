"""Export a training checkpoint as a Hugging Face model directory.

    config.json, generation_config.json, model.safetensors, tokenizer files
    modeling_stem_llama.py   STEM models only: our modeling file, named by config.json's
                             auto_map (load with trust_remote_code=True)

A dense model becomes a plain LlamaForCausalLM; a STEM model a StemLlamaForCausalLM
(stem_megatron/hf/modeling_stem_llama.py, copied verbatim). Weights are written in fp32 as
the checkpoint holds them. Exact-mode tables need no settling here: a checkpoint's save
settles every row first (training/state.py, SparseRowAdamW.state_dict). The caller must
have initialised a world-of-one ParallelState.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.hf import modeling_stem_llama
from stem_megatron.hf.llama_config import MODELING_MODULE, hf_config_from_model
from stem_megatron.hf.staged_output import staged_output_dir
from stem_megatron.hf.tokenizer_files import write_tokenizer_files
from stem_megatron.hf.weights import hf_from_megatron


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def export_checkpoint(
    checkpoint: str,
    out: Path,
    tokenizer_path: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    out = Path(out).absolute()
    with staged_output_dir(out) as staging:
        log(f"loading {checkpoint}")
        loaded = load_for_inference(checkpoint, tokenizer_path)
        spec, m = loaded.model.spec, loaded.config.model
        stem_layers = sorted(spec.stem_layers)
        state = {
            name: t for name, t in loaded.model.state_dict().items() if isinstance(t, torch.Tensor)
        }  # megatron adds non-tensor _extra_state
        tensors = hf_from_megatron(state, m, spec.vocab_size, set(stem_layers))
        del state, loaded.model
        log(f"writing {len(tensors)} tensors to {out / 'model.safetensors'}")
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        eod = loaded.tokenizer.eod_id
        _write_json(
            staging / "config.json", hf_config_from_model(m, spec.vocab_size, stem_layers, eod)
        )
        _write_json(staging / "generation_config.json", {"eos_token_id": eod, "pad_token_id": eod})
        if stem_layers:
            shutil.copyfile(modeling_stem_llama.__file__, staging / f"{MODELING_MODULE}.py")
        write_tokenizer_files(
            tokenizer_path or loaded.config.data.tokenizer, loaded.tokenizer, staging, m.seq_length
        )
    kind = f"STEM in layers {stem_layers}" if stem_layers else "dense Llama"
    log(f"exported step {loaded.step} ({kind}) -> {out}")
    return out
