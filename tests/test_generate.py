"""Generation from a saved checkpoint through tools/generate.py, the sampling rules of
stem_megatron/generation.py, and the vocabulary it may produce."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.generation import generate_ids, generate_text
from stem_megatron.model.transformer import ModelSpec, StemGPTModel
from stem_megatron.parallel.state import ParallelState
from stem_megatron.training.trainer import Trainer
from tools import generate


@pytest.fixture
def trained_run(tiny_config):
    config = tiny_config("train.train_iters=2", "optim.lr_warmup_iters=0", "train.eval_interval=0")
    parallel = ParallelState.initialize()
    try:
        Trainer(config, parallel).run()
    finally:
        parallel.destroy()
    return config.run_dir


def run_generate(capsys, *args: str) -> tuple[int, str, str]:
    code = generate.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_and_sampled_generation_from_checkpoint(trained_run, capsys):
    base = ["--checkpoint", str(trained_run), "--prompt", "ROMEO.", "--max-new-tokens", "12"]
    code, greedy, _ = run_generate(capsys, *base)
    assert code == 0 and greedy.startswith("ROMEO.") and len(greedy.strip()) > len("ROMEO.")
    assert run_generate(capsys, *base)[1] == greedy  # greedy is deterministic
    sampled = [run_generate(capsys, *base, "--temperature", "1.0", "--top-k", "20",
                            "--seed", "1")[1] for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same text
    assert sampled[0].startswith("ROMEO.")


def test_top_k_one_is_greedy_and_the_seed_decides_samples(trained_run):
    parallel = ParallelState.initialize()
    try:
        loaded = load_for_inference(str(trained_run))
        model, tokenizer = loaded.model, loaded.tokenizer
        prompt = tokenizer.encode("ROMEO.")
        kwargs = dict(max_new_tokens=12, vocab_size=tokenizer.vocab_size,
                      seq_length=model.spec.model.seq_length)
        greedy = generate_ids(model, prompt, **kwargs)
        # Two training steps leave the distribution nearly flat: any sampling that kept more
        # than the likeliest token would leave the greedy path within a few tokens.
        for temperature, seed in ((0.5, 0), (1.0, 1), (5.0, 2)):
            assert generate_ids(model, prompt, temperature=temperature, top_k=1, seed=seed,
                                **kwargs) == greedy
        sample = {seed: generate_text(model, tokenizer, "ROMEO.", max_new_tokens=12,
                                      temperature=1.0, top_k=20, seed=seed) for seed in range(4)}
        assert generate_text(model, tokenizer, "ROMEO.", max_new_tokens=12, temperature=1.0,
                             top_k=20, seed=0) == sample[0]
        assert len(set(sample.values())) > 1  # the seed, not something fixed, drives sampling
    finally:
        parallel.destroy()


def _model_of_vocab(config, vocab_size: int) -> StemGPTModel:
    spec = ModelSpec(model=config.model, vocab_size=vocab_size,
                     stem_layers=tuple(config.stem_layers()))
    model = StemGPTModel(spec)
    model.init_parameters(seed=0)
    return model


def test_generation_produces_only_ids_the_tokenizer_can_decode(tiny_config, parallel):
    """A model vocab set above the tokenizer's (model.vocab_size, or embedding padding) has
    logits for ids no text maps to; a decoder silently drops such ids."""
    config = tiny_config()
    tokenizer = load_tokenizer(config.data.tokenizer)
    model = _model_of_vocab(config, tokenizer.vocab_size + 88)
    assert model.spec.padded_vocab_size > model.spec.vocab_size > tokenizer.vocab_size
    # Make the ids past the tokenizer's vocab the likeliest by far.
    beyond = torch.zeros(model.spec.padded_vocab_size)
    beyond[tokenizer.vocab_size:] = 1e4
    model.register_forward_hook(lambda module, args, logits: logits + beyond)
    prompt = tokenizer.encode("ROMEO.")
    unrestricted = generate_ids(model, prompt, max_new_tokens=6, vocab_size=model.spec.vocab_size,
                                seq_length=config.model.seq_length)
    assert min(unrestricted[len(prompt):]) >= tokenizer.vocab_size  # the hook bites
    for temperature in (0.0, 1.0):
        text = generate_text(model, tokenizer, "ROMEO.", max_new_tokens=6,
                             temperature=temperature)
        ids = generate_ids(model, prompt, max_new_tokens=6, vocab_size=tokenizer.vocab_size,
                           seq_length=config.model.seq_length, temperature=temperature)
        assert text == tokenizer.decode(ids) and len(text) > len("ROMEO.")


def test_a_tokenizer_larger_than_the_model_is_a_clear_error(tiny_config, parallel):
    config = tiny_config()
    tokenizer = load_tokenizer(config.data.tokenizer)
    model = _model_of_vocab(config, tokenizer.vocab_size - 1)
    with pytest.raises(ValueError, match="use the tokenizer the model was trained with"):
        generate_text(model, tokenizer, "ROMEO.", max_new_tokens=2)


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_generate(capsys, "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 1 and "no such checkpoint path" in err
