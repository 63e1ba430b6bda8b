"""Cached generation of an exported STEM model in transformers: every decoding step's scores
equal our model's full recomputation of the same sequence, on a trained model whose greedy
text varies from token to token. Runs under each transformers our requirements admit
(`make test-hf-min` runs it under the lowest)."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.generation import generate_ids
from tests.devices import on_cuda

PROMPTS = ["ROMEO. What light", "KING. My lord,", "And"]
NEW_TOKENS = 16


@pytest.fixture
def models(trained_stem_export, parallel):
    """(ours, theirs): our checkpoint and its export loaded by transformers."""
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(
        trained_stem_export.hf_dir, trust_remote_code=True
    ).eval()
    return load_for_inference(str(trained_stem_export.run)), theirs


def our_greedy(ours, prompt: list[int]) -> list[int]:
    return generate_ids(
        ours.model,
        prompt,
        max_new_tokens=NEW_TOKENS,
        vocab_size=ours.model.spec.vocab_size,
        seq_length=ours.config.model.seq_length,
    )


@pytest.mark.parametrize("device", ["cpu", on_cuda()])
@pytest.mark.parametrize("text", PROMPTS)
def test_each_cached_step_scores_as_the_full_recomputation(models, text, device):
    from transformers import __version__

    ours, theirs = models
    theirs.to(device)  # ours stays on the CPU: the reference
    prompt = ours.tokenizer.encode(text)
    expected = our_greedy(ours, prompt)
    new = expected[len(prompt) :]
    # What gives the test its power: the next token differs from the last one at most steps,
    # so the current and the previous token index different table rows.
    assert len(set(new)) >= 5 and sum(a != b for a, b in zip(new, new[1:])) >= NEW_TOKENS // 2
    out = theirs.generate(
        torch.tensor([prompt], device=device),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    cached = torch.cat(out.logits).cpu()  # [NEW_TOKENS, vocab]: one row per decoding step
    vocab = cached.shape[-1]
    with torch.no_grad():
        full = ours.model(torch.tensor([expected]))[0, len(prompt) - 1 : -1, :vocab]
    diff = (cached - full).abs().max().item()
    print(
        f"transformers {__version__}, {text!r}: {ours.tokenizer.decode(new)!r}; max abs diff "
        f"of cached step scores from full recomputation {diff:.3g}, max |score| "
        f"{full.abs().max().item():.3g}"
    )
    assert diff < 1e-4
    assert out.sequences[0].tolist() == expected


def test_left_padded_batch_generates_as_each_prompt_alone(models):
    """A batch pads shorter prompts on the left (as lm_eval does): the padding is masked."""
    ours, theirs = models
    prompts = [ours.tokenizer.encode(text) for text in PROMPTS]
    width = max(map(len, prompts))
    assert min(map(len, prompts)) < width
    pad = ours.tokenizer.eod_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = theirs.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad
    )
    for row, prompt in zip(out, prompts):
        assert row[width:].tolist() == our_greedy(ours, prompt)[len(prompt) :]
