"""Hugging Face export, checked by loading the directory with transformers itself: a dense
model as LlamaForCausalLM, a STEM model through our modeling file (trust_remote_code), logits
equal ours, exact-mode tables settled."""

from __future__ import annotations

import json

import pytest
import torch

from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.hf.exporter import export_checkpoint
from stem_megatron.training.trainer import Trainer


def train(tiny_config, parallel, *overrides: str):
    config = tiny_config("train.train_iters=3", "train.eval_interval=0", *overrides)
    trainer = Trainer(config, parallel)
    trainer.run()
    return config.run_dir, trainer


def logit_diff(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int, what: str) -> float:
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = ours(ids)[..., :vocab]
        diff = (mine - theirs(ids).logits).abs().max().item()
    print(f"{what}: max abs logit diff {diff:.3g}, max |logit| {mine.abs().max().item():.3g}")
    return diff


@pytest.mark.parametrize("untie", [False, True])
def test_dense_export_loads_as_llama_with_equal_logits(tiny_config, parallel, tmp_path, untie):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    run, _ = train(
        tiny_config,
        parallel,
        "stem.enabled=false",
        f"model.untie_embeddings_and_output_weights={str(untie).lower()}",
    )
    out = export_checkpoint(str(run), tmp_path / "hf", log=lambda _: None)
    assert not (out / "modeling_stem_llama.py").exists()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf) is LlamaForCausalLM and hf.config.tie_word_embeddings is not untie
    ours = load_for_inference(str(run))
    assert (
        logit_diff(ours.model, hf, ours.model.spec.vocab_size, f"export dense untie={untie}") < 1e-5
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "ROMEO. What light through yonder window breaks?"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.tokenizer.encode(text)
    assert tokenizer.eos_token_id == ours.tokenizer.eod_id


def test_stem_export_loads_with_our_modeling_file(trained_stem_export, parallel):
    """Cached generation of this export: tests/hf/test_hf_generate.py."""
    from transformers import AutoModelForCausalLM

    out = trained_stem_export.hf_dir
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_stem_llama.StemLlamaForCausalLM"
    assert config["stem_layers"] == [1, 2]
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "StemLlamaForCausalLM"
    assert type(hf).__module__ != "stem_megatron.hf.modeling_stem_llama"  # the exported copy
    ours = load_for_inference(str(trained_stem_export.run))
    table = ours.model.decoder.layers["1"].mlp.stem_table.weight
    assert torch.equal(hf.model.layers[1].mlp.stem_table.weight, table)
    assert logit_diff(ours.model, hf, ours.model.spec.vocab_size, "export STEM") < 1e-5


def test_exact_mode_tables_are_settled_in_the_saved_checkpoint(tiny_config, parallel, tmp_path):
    config = tiny_config(
        "train.train_iters=4",
        "train.eval_interval=0",
        "stem.optimizer.mode=exact",
        "optim.lr_warmup_iters=0",
    )
    trainer = Trainer(config, parallel)
    for _ in range(4):
        trainer.train_step()
    sparse = trainer.tables.optimizer
    name, live = next(iter(trainer.tables.tables.items()))
    idle = sparse.unsettled({name: torch.arange(live.weight.shape[0])})[name]
    assert idle.numel() > 0  # some rows owe idle steps (momentum and decay) before the save
    before = live.weight.detach().clone()
    trainer.state.save(trainer.checkpointer, trainer.step, config)
    assert not torch.equal(live.weight[idle], before[idle])  # the save settled them
    out = export_checkpoint(str(config.run_dir), tmp_path / "hf", log=lambda _: None)
    from safetensors.torch import load_file

    layer = name.split(".")[2]
    exported = load_file(out / "model.safetensors")[f"model.layers.{layer}.mlp.stem_table.weight"]
    assert torch.equal(exported, live.weight.detach())


def test_export_errors_leave_nothing(parallel, tmp_path):
    from stem_megatron.checkpoint.errors import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint path"):
        export_checkpoint(str(tmp_path / "missing"), tmp_path / "o", log=lambda _: None)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_checkpoint(str(tmp_path / "missing"), tmp_path / "taken", log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("stem", [False, True])
def test_import_then_export_round_trip(hf_llama, parallel, tmp_path, stem):
    """Weights far from init (logits of several units): import, export, load with transformers."""
    from transformers import AutoModelForCausalLM

    from stem_megatron.hf.importer import import_llama

    hf_dir, original = hf_llama(tied=False)
    overrides = ["stem.layers=[1,2]"] if stem else ["stem.enabled=false"]
    imported = import_llama(hf_dir, tmp_path / "imported", overrides, log=lambda _: None)
    out = export_checkpoint(str(imported / "checkpoints"), tmp_path / "hf", log=lambda _: None)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=stem).eval()
    ours = load_for_inference(str(imported / "checkpoints"))
    ids = torch.randint(0, 520, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, theirs = ours.model(ids)[..., :520], hf(ids).logits
    diff = (mine - theirs).abs().max().item()
    print(
        f"round trip stem={stem}: max abs logit diff {diff:.3g}, max |logit| "
        f"{mine.abs().max().item():.3g}"
    )
    assert mine.abs().max() > 1.0 and diff < 1e-5
    if not stem:  # the same weights as the model we started from
        for name, p in original.state_dict().items():
            assert torch.equal(hf.state_dict()[name], p), name
