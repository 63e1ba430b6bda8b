"""Generation from a saved checkpoint through tools/generate.py, the sampling rules of
stem_megatron/generation.py, and the vocabulary it may produce."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.cli import generate
from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.generation import generate_ids, generate_text
from stem_megatron.model.reference import ReferenceGPT
from stem_megatron.model.transformer import ModelSpec, StemGPTModel
from stem_megatron.parallel.state import ParallelState
from tests.devices import on_cuda


def run_generate(capsys, *args: str) -> tuple[int, str, str]:
    code = generate.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def reference_argmax(loaded, ids: list[int], start: int) -> list[int]:
    """For each position from `start` on, the likeliest id after the model.seq_length tokens
    before it, by the plain reference model on the checkpoint's weights: one full forward
    per position, no state carried between them."""
    spec = loaded.model.spec
    reference = ReferenceGPT(
        spec.model,
        spec.stem_layers,
        {k: v for k, v in loaded.model.state_dict().items() if isinstance(v, torch.Tensor)},
    )
    seq, vocab = spec.model.seq_length, loaded.tokenizer.vocab_size
    with torch.no_grad():
        return [
            int(reference.logits(torch.tensor([ids[max(0, p - seq) : p]]))[0, -1, :vocab].argmax())
            for p in range(start, len(ids))
        ]


@pytest.mark.parametrize("device", ["cpu", on_cuda()])
def test_greedy_generation_is_the_reference_argmax_at_every_step(trained_stem_run, capsys, device):
    """Greedy ids, past model.seq_length (where the context window slides), each equal the
    reference model's likeliest next id (on the CPU); the CLI prints exactly their text. The
    trained model continues with varied tokens, so a wrong position or window changes the
    ids."""
    new_tokens = 40
    parallel = ParallelState.initialize()
    try:
        loaded = load_for_inference(str(trained_stem_run))
        prompt = loaded.tokenizer.encode("ROMEO.")
        seq = loaded.model.spec.model.seq_length
        assert len(prompt) + new_tokens > seq + 5  # the window slides for several steps
        ids = generate_ids(
            loaded.model.to(device),
            prompt,
            max_new_tokens=new_tokens,
            vocab_size=loaded.tokenizer.vocab_size,
            seq_length=seq,
            device=device,
        )
        loaded.model.cpu()  # the reference reads the weights on the CPU
        expected = reference_argmax(loaded, ids, len(prompt))
    finally:
        parallel.destroy()
    continuation = ids[len(prompt) :]
    assert continuation == expected
    assert len(set(continuation)) >= 10  # not one repeated token
    code, text, _ = run_generate(
        capsys,
        "--checkpoint",
        str(trained_stem_run),
        "--prompt",
        "ROMEO.",
        "--max-new-tokens",
        str(new_tokens),
    )
    assert code == 0 and text == loaded.tokenizer.decode(ids) + "\n"


def test_sampled_generation_from_checkpoint_is_seeded(trained_run, capsys):
    base = ["--checkpoint", str(trained_run), "--prompt", "ROMEO.", "--max-new-tokens", "12"]
    sampled = [
        run_generate(capsys, *base, "--temperature", "1.0", "--top-k", "20", "--seed", str(seed))[1]
        for seed in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]  # the seed decides the text
    assert sampled[0].startswith("ROMEO.")


def test_top_k_one_is_greedy_and_the_seed_decides_samples(trained_run):
    parallel = ParallelState.initialize()
    try:
        loaded = load_for_inference(str(trained_run))
        model, tokenizer = loaded.model, loaded.tokenizer
        prompt = tokenizer.encode("ROMEO.")
        kwargs = dict(
            max_new_tokens=12,
            vocab_size=tokenizer.vocab_size,
            seq_length=model.spec.model.seq_length,
        )
        greedy = generate_ids(model, prompt, **kwargs)
        # Two training steps leave the distribution nearly flat: any sampling that kept more
        # than the likeliest token would leave the greedy path within a few tokens.
        for temperature, seed in ((0.5, 0), (1.0, 1), (5.0, 2)):
            assert (
                generate_ids(model, prompt, temperature=temperature, top_k=1, seed=seed, **kwargs)
                == greedy
            )
        sample = {
            seed: generate_text(
                model, tokenizer, "ROMEO.", max_new_tokens=12, temperature=1.0, top_k=20, seed=seed
            )
            for seed in range(4)
        }
        assert (
            generate_text(
                model, tokenizer, "ROMEO.", max_new_tokens=12, temperature=1.0, top_k=20, seed=0
            )
            == sample[0]
        )
        assert len(set(sample.values())) > 1  # the seed, not something fixed, drives sampling
    finally:
        parallel.destroy()


def _model_of_vocab(config, vocab_size: int) -> StemGPTModel:
    spec = ModelSpec(
        model=config.model, vocab_size=vocab_size, stem_layers=tuple(config.stem_layers())
    )
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
    beyond[tokenizer.vocab_size :] = 1e4
    model.register_forward_hook(lambda module, args, logits: logits + beyond)
    prompt = tokenizer.encode("ROMEO.")
    unrestricted = generate_ids(
        model,
        prompt,
        max_new_tokens=6,
        vocab_size=model.spec.vocab_size,
        seq_length=config.model.seq_length,
    )
    assert min(unrestricted[len(prompt) :]) >= tokenizer.vocab_size  # the hook bites
    for temperature in (0.0, 1.0):
        text = generate_text(model, tokenizer, "ROMEO.", max_new_tokens=6, temperature=temperature)
        ids = generate_ids(
            model,
            prompt,
            max_new_tokens=6,
            vocab_size=tokenizer.vocab_size,
            seq_length=config.model.seq_length,
            temperature=temperature,
        )
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
