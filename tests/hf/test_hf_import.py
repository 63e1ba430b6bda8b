"""Hugging Face Llama import: logits equal transformers' with STEM off, STEM layers get
fresh tables and keep their gate/down, the written config trains, bad input is named."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.config import ConfigError
from stem_megatron.config_loader import load_config
from stem_megatron.hf.importer import import_llama
from stem_megatron.hf.llama_config import HFFormatError
from stem_megatron.model.init import block_generator
from stem_megatron.stem.table import xavier_normal_std
from stem_megatron.training.trainer import Trainer

VOCAB = 520


def max_logit_diff(ours: torch.nn.Module, hf: torch.nn.Module, seed: int = 0) -> float:
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        mine = ours(ids)[..., :VOCAB]
        theirs = hf(ids).logits
    assert mine.shape == theirs.shape
    return (mine - theirs).abs().max().item()


@pytest.mark.parametrize(
    "tied,sharded,dtype,extra",
    [
        (False, False, torch.float32, []),
        (True, False, torch.float32, []),
        (False, True, torch.float32, ["model.make_vocab_size_divisible_by=64"]),  # 56 zero rows
        (True, False, torch.bfloat16, []),  # bf16 weights on disk, read into our fp32 model
    ],
)
def test_dense_import_matches_transformers_logits(
    hf_llama, parallel, tmp_path, tied, sharded, dtype, extra
):
    hf_dir, hf_model = hf_llama(tied=tied, sharded=sharded, dtype=dtype)
    if sharded:
        assert (hf_dir / "model.safetensors.index.json").is_file()
    out = import_llama(
        hf_dir, tmp_path / "imported", ["stem.enabled=false", *extra], log=lambda _: None
    )
    loaded = load_for_inference(str(out / "checkpoints"))
    assert loaded.config.model.untie_embeddings_and_output_weights is not tied
    diff = max_logit_diff(loaded.model, hf_model)
    print(f"import dense tied={tied} sharded={sharded} {dtype}: max abs logit diff {diff:.3g}")
    assert diff < 1e-5


def test_stem_import_keeps_dense_layers_and_initialises_tables(hf_llama, parallel, tmp_path):
    hf_dir, hf_model = hf_llama()
    before = {p.name: p.read_bytes() for p in hf_dir.iterdir()}
    out = import_llama(hf_dir, tmp_path / "stem", ["stem.layers=[1,2]"], log=lambda _: None)
    assert {p.name: p.read_bytes() for p in hf_dir.iterdir()} == before  # input untouched
    loaded = load_for_inference(str(out / "checkpoints"))
    ours = dict(loaded.model.named_parameters())
    theirs = dict(hf_model.named_parameters())
    layer0 = "decoder.layers.0.mlp.linear_fc1.weight"
    assert torch.equal(
        ours[layer0],
        torch.cat(
            [
                theirs["model.layers.0.mlp.gate_proj.weight"],
                theirs["model.layers.0.mlp.up_proj.weight"],
            ]
        ),
    )
    for n in (1, 2):
        mlp = f"decoder.layers.{n}.mlp."
        assert torch.equal(
            ours[mlp + "linear_fc1.weight"], theirs[f"model.layers.{n}.mlp.gate_proj.weight"]
        )
        assert torch.equal(
            ours[mlp + "linear_fc2.weight"], theirs[f"model.layers.{n}.mlp.down_proj.weight"]
        )
        table = ours[mlp + "stem_table.weight"]
        assert table.shape == (VOCAB, 64)
        expected = torch.empty(VOCAB, 64).normal_(
            0.0,
            xavier_normal_std(VOCAB, 64),
            generator=block_generator(loaded.config.train.seed, mlp + "stem_table.weight", 0),
        )
        assert torch.equal(table, expected)  # our model's own xavier-normal draw
    for name in (
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        "decoder.layers.2.self_attention.linear_proj.weight",
    ):
        assert ours[name].abs().sum() > 0

    config = load_config(out / "config.yaml")
    assert config.stem_layers() == [1, 2] and config.checkpoint.finetune
    assert config.checkpoint.load == str(out / "checkpoints")
    assert config.stem.optimizer.lr == 5e-4 and config.optim.lr == 1e-5
    assert config.data.tokenizer == str(out / "tokenizer.json")
    metadata = json.loads((out / "checkpoints/step_0/metadata.json").read_text())
    assert metadata["model_only"] and metadata["step"] == 0


def test_imported_config_continues_pretraining(hf_llama, parallel, tmp_path, small_corpus):
    hf_dir, _ = hf_llama()
    out = import_llama(hf_dir, tmp_path / "cpt", log=lambda _: None)
    config = load_config(
        out / "config.yaml",
        [
            f"data.train_data={small_corpus['train']}",
            f"data.valid_data={small_corpus['val']}",
            f"logging.run_dir={tmp_path / 'run'}",
            "train.train_iters=2",
            "train.eval_interval=0",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            "train.eval_iters=1",
        ],
    )
    trainer = Trainer(config, parallel)
    imported = load_for_inference(str(out / "checkpoints")).model.state_dict()
    for name, p in trainer.chunks[0].named_parameters():
        assert torch.equal(p, imported[name]), name
    result = trainer.run()
    assert result.step == 2 and math.isfinite(result.train_loss)
    unchanged = [
        name for name, p in trainer.chunks[0].named_parameters() if torch.equal(p, imported[name])
    ]
    assert not unchanged  # every weight trained: dense layers, norms and the fresh tables


def test_other_architectures_are_refused_by_name(tmp_path, parallel):
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    ).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(HFFormatError, match="GPT2LMHeadModel.*'gpt2'.*only Llama"):
        import_llama(tmp_path / "gpt2", tmp_path / "o1", log=lambda _: None)
    MistralForCausalLM(
        MistralConfig(
            num_hidden_layers=1,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
            sliding_window=8,
        )
    ).save_pretrained(tmp_path / "m")
    with pytest.raises(HFFormatError, match="MistralForCausalLM.*'mistral'"):
        import_llama(tmp_path / "m", tmp_path / "o2", log=lambda _: None)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_bad_input_is_named_and_leaves_nothing(hf_llama, parallel, tmp_path):
    with pytest.raises(HFFormatError, match="does not exist"):
        import_llama(tmp_path / "nope", tmp_path / "o", log=lambda _: None)
    hf_dir, _ = hf_llama()
    with pytest.raises(ConfigError, match="model.hidden_size cannot be overridden"):
        import_llama(hf_dir, tmp_path / "o", ["model.hidden_size=64"], log=lambda _: None)
    small, _ = hf_llama(name="small_vocab", vocab_size=500)  # the tokenizer has 512 tokens
    with pytest.raises(HFFormatError, match="has 512 tokens but the model's vocab_size is 500"):
        import_llama(small, tmp_path / "o", log=lambda _: None)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        import_llama(hf_dir, tmp_path / "taken", log=lambda _: None)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(
        json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5}})
    )
    with pytest.raises(HFFormatError, match="RoPE scaling 'yarn'"):
        import_llama(hf_dir, tmp_path / "o", log=lambda _: None)
    (hf_dir / "config.json").write_text(json.dumps(config))
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(HFFormatError, match="neither model.safetensors"):
        import_llama(hf_dir, tmp_path / "o", log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_llama", "small_vocab", "taken"]


def test_calibrated_tables_are_the_dense_up_projection_averaged_per_token(
    hf_llama, parallel, tmp_path, small_corpus
):
    from stem_megatron.data.indexed import open_dataset
    from stem_megatron.hf.importer import Calibration

    hf_dir, hf_model = hf_llama()
    windows, seq = 20, 32
    out = import_llama(
        hf_dir,
        tmp_path / "cal",
        ["stem.layers=[1,2]"],
        calibration=Calibration(str(small_corpus["train"]), windows * seq),
        log=lambda _: None,
    )
    tables = load_for_inference(str(out / "checkpoints")).model.stem_tables()
    # The same average from transformers' own modules: hooks on up_proj.
    ids = torch.from_numpy(
        open_dataset(small_corpus["train"]).tokens[: windows * seq].astype("int64")
    ).view(windows, seq)
    ups = {}
    hooks = [
        hf_model.model.layers[n].mlp.up_proj.register_forward_hook(
            lambda _m, _i, output, n=n: ups.__setitem__(n, output)
        )
        for n in (1, 2)
    ]
    with torch.no_grad():
        hf_model(ids)
    for handle in hooks:
        handle.remove()
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=VOCAB).double()
    seen = counts > 0
    assert 0 < int(seen.sum()) < VOCAB  # both rules are exercised
    for n in (1, 2):
        up = ups[n].reshape(-1, 64).double()
        sums = torch.zeros(VOCAB, 64, dtype=torch.float64).index_add_(0, flat, up)
        table = tables[f"decoder.layers.{n}.mlp.stem_table"].weight.double()
        torch.testing.assert_close(
            table[seen], sums[seen] / counts[seen, None], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            table[~seen], up.mean(0).expand(int((~seen).sum()), 64), atol=1e-5, rtol=1e-5
        )
    source = json.loads((out / "checkpoints/step_0/metadata.json").read_text())["source"]
    assert source["tables"] == {
        "calibrated": str(small_corpus["train"]),
        "max_tokens": windows * seq,
    }
