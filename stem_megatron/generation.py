"""Sampling from a trained model: greedy, temperature and top-k.

Without a KV cache the whole (cropped) context is recomputed per token: fine for the small
models and short samples this serves (reports, smoke tests, the editing demo).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stem_megatron.data.tokenizer import Tokenizer

# Maps the ids of a context to the ids its STEM lookups use (on-the-fly knowledge editing).
StemIds = Callable[[list[int]], list[int]]


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt_ids: list[int], *, max_new_tokens: int,
                 vocab_size: int, seq_length: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", stem_ids: StemIds | None = None) -> list[int]:
    """Continue `prompt_ids` with ids below `vocab_size`. temperature 0 is greedy; top_k keeps
    the k likeliest tokens.
    `stem_ids` (optional) gives, for each context, the ids its STEM tables are indexed by."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            window = ids[-seq_length:]
            context = torch.tensor([window], device=device)
            if stem_ids is None:
                logits = model(context)
            else:
                logits = model(context, stem_ids=torch.tensor([stem_ids(window)], device=device))
            logits = logits[0, -1, :vocab_size].float().cpu()  # drop ids past the vocab
            if temperature == 0:
                next_id = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k is not None and top_k < vocab_size:
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            ids.append(next_id)
    finally:
        model.train(was_training)
    return ids


def generate_text(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, *,
                  max_new_tokens: int = 50, temperature: float = 0.0, top_k: int | None = None,
                  seed: int = 0, stem_ids: StemIds | None = None) -> str:
    """Prompt plus continuation, decoded. Only ids the tokenizer can decode are generated:
    a model vocab set larger than the tokenizer's has rows no text maps to."""
    spec = model.spec
    if tokenizer.vocab_size > spec.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the "
                         f"model only {spec.vocab_size}: use the tokenizer the model was trained with")
    device = next(model.parameters()).device
    ids = generate_ids(model, tokenizer.encode(prompt), max_new_tokens=max_new_tokens,
                       vocab_size=tokenizer.vocab_size, seq_length=spec.model.seq_length,
                       temperature=temperature, top_k=top_k, seed=seed, device=device,
                       stem_ids=stem_ids)
    return tokenizer.decode(ids)
