"""Sampling from a trained model: greedy, temperature and top-k.

Without a KV cache the whole (cropped) context is recomputed per token: fine for the small
models and short samples this serves (reports, smoke tests, the editing demo).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stem_megatron.data.tokenizer import Tokenizer
from stem_megatron.repo_paths import REPO_ROOT

if TYPE_CHECKING:
    from stem_megatron.parallel.state import ParallelState

# Maps the ids of a context to the ids its STEM lookups use (on-the-fly knowledge editing).
StemIds = Callable[[list[int]], list[int]]


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    vocab_size: int,
    seq_length: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    stem_ids: StemIds | None = None,
) -> list[int]:
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
        # Exactly max_new_tokens forwards, never fewer: ranks whose lookups are collectives
        # generate together and must run the same number.
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


def generate_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stem_ids: StemIds | None = None,
) -> str:
    """Prompt plus continuation, decoded. Only ids the tokenizer can decode are generated:
    a model vocab set larger than the tokenizer's has rows no text maps to."""
    spec = model.spec
    if tokenizer.vocab_size > spec.vocab_size:
        raise ValueError(
            f"the tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the "
            f"model only {spec.vocab_size}: use the tokenizer the model was trained with"
        )
    device = next(model.parameters()).device
    ids = generate_ids(
        model,
        tokenizer.encode(prompt),
        max_new_tokens=max_new_tokens,
        vocab_size=tokenizer.vocab_size,
        seq_length=spec.model.seq_length,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        device=device,
        stem_ids=stem_ids,
    )
    return tokenizer.decode(ids)


@dataclass(frozen=True)
class SampleSettings:
    """The short sample a training run ends with. `command` draws the same text from a
    checkpoint with tools/generate.py (on the same kind of device)."""

    prompt: str
    seed: int
    max_new_tokens: int = 60
    temperature: float = 0.8
    top_k: int = 40

    def generate(self, model: torch.nn.Module, tokenizer: Tokenizer) -> str:
        return generate_text(
            model,
            tokenizer,
            self.prompt,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed,
        )

    def command(self, checkpoint: str | Path) -> str:
        tool = REPO_ROOT / "tools" / "generate.py"
        here = Path.cwd().resolve()
        if tool.is_relative_to(here):  # as the docs write paths, from the repository
            tool = tool.relative_to(here)
        return shlex.join(
            [
                "python",
                str(tool),
                "--checkpoint",
                str(checkpoint),
                "--prompt",
                self.prompt,
                "--max-new-tokens",
                str(self.max_new_tokens),
                "--temperature",
                str(self.temperature),
                "--top-k",
                str(self.top_k),
                "--seed",
                str(self.seed),
            ]
        )


def end_of_run_sample(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    parallel: ParallelState,
    settings: SampleSettings,
    checkpoint: str | Path,
) -> str | None:
    """The `sample:` line a training run ends with, on the main rank (None on the others).
    Every rank calls this. Where each rank runs the whole model, the main rank generates,
    with every rank of its DP group in lockstep when the tables are vocab-sharded (each
    lookup gathers rows from their owners). Where TP or PP split the model, the line says so
    and names the tools/generate.py command that draws the sample from `checkpoint`."""
    if not parallel.runs_whole_model:
        line = (
            f"sample: skipped: TP x PP = {parallel.tp_size} x {parallel.pp_size} splits the "
            f"model over ranks, so no rank generates alone; the same sample from this run's "
            f"checkpoint: {settings.command(checkpoint)}"
        )
    else:
        lookups_are_collective = any(
            table.row_block is not None for table in model.stem_tables().values()
        )
        if not (parallel.is_main or lookups_are_collective):
            return None
        line = f"sample: {settings.generate(model, tokenizer)!r}"
    return line if parallel.is_main else None
