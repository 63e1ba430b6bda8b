"""Statistics of a checkpoint's STEM tables, and of a dense model's up-projection outputs.

Angular spread: the cosine similarity between random pairs of vectors (its mean, spread and
quantiles). For a STEM layer the vectors are table rows U_l[t]; for a dense layer they are the
up-projection outputs W_up x of the FFN input x (after pre_mlp_layernorm) on real tokens.

Rows never updated: a table row is counted as updated when its table-optimizer second moment
(`stem_optim.tables.<table>.exp_avg_sq`) has a non-zero element. A row's first gradient makes
it positive (g^2 > 0 unless the gradient is exactly zero); lazy mode then freezes it, exact
mode decays it by beta2 per idle step, which reaches fp32 zero only after ~ln(1e-35)/ln(beta2)
idle steps (1.6k for beta2 = 0.95, 80k for 0.999): rows idle that long in exact mode count as
never updated. Comparing with the initial values would not work: exact mode's weight decay
moves every row, touched or not, as dense AdamW does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from stem_megatron.checkpoint.offline import OfflineCheckpoint
from stem_megatron.data.indexed import open_dataset

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class Spread:
    """Cosine similarities of random vector pairs."""

    cosines: torch.Tensor  # float64 [pairs]

    def summary(self) -> dict[str, float]:
        c = self.cosines
        if c.numel() == 0:
            return {"pairs": 0}
        q = torch.quantile(c, torch.tensor(QUANTILES, dtype=c.dtype))
        return {
            "pairs": c.numel(),
            "mean": c.mean().item(),
            "std": c.std().item(),
            "mean_abs": c.abs().mean().item(),
            **{f"p{round(p * 100)}": v.item() for p, v in zip(QUANTILES, q)},
        }


def random_pairs(
    n: int, pairs: int, generator: torch.Generator, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pairs` index pairs (i, j) drawn uniformly with i != j, and, given `labels`, with
    labels[i] != labels[j] (pairs of equal labels are dropped, so fewer may return)."""
    if n < 2:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    i = torch.randint(n, (pairs,), generator=generator)
    j = (i + torch.randint(1, n, (pairs,), generator=generator)) % n
    if labels is not None:
        keep = labels[i] != labels[j]
        i, j = i[keep], j[keep]
    return i, j


def cosine_spread(
    vectors: torch.Tensor,
    pairs: int,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
) -> Spread:
    """Spread of `vectors` [n, d]; zero vectors (no direction) are left out."""
    vectors = vectors.double()
    norms = vectors.norm(dim=1)
    nonzero = norms > 0
    vectors, norms = vectors[nonzero], norms[nonzero]
    labels = labels[nonzero] if labels is not None else None
    i, j = random_pairs(vectors.shape[0], pairs, generator, labels)
    cos = (vectors[i] * vectors[j]).sum(dim=1) / (norms[i] * norms[j])
    return Spread(cos)


def norm_summary(norms: torch.Tensor) -> dict[str, float]:
    if norms.numel() == 0:
        return {"rows": 0}
    return {
        "rows": norms.numel(),
        "mean": norms.mean().item(),
        "std": norms.std().item() if norms.numel() > 1 else 0.0,
        "min": norms.min().item(),
        "max": norms.max().item(),
    }


@dataclass
class TableStats:
    layer: int
    key: str
    rows: int
    width: int
    updated: int | None  # None: the checkpoint holds no table optimizer state
    norms: dict[str, float]  # over all rows
    updated_norms: dict[str, float] | None
    spread: Spread  # random pairs of distinct (updated, if known) rows
    token_spread: Spread | None = None  # rows of random pairs of distinct data tokens
    extra: dict = field(default_factory=dict)


def layer_of(key: str) -> int:
    """The global layer number in a `...decoder.layers.<N>....` key."""
    parts = key.split(".")
    return int(parts[parts.index("layers") + 1])


def table_keys(ckpt: OfflineCheckpoint) -> list[str]:
    keys = [k for k in ckpt.keys() if k.startswith("model.") and k.endswith(".stem_table.weight")]
    return sorted(keys, key=layer_of)


def updated_rows(ckpt: OfflineCheckpoint, key: str) -> torch.Tensor | None:
    """Rows whose table-optimizer second moment is non-zero (see the module doc), or None."""
    state = f"stem_optim.tables.{key[len('model.') : -len('.weight')]}.exp_avg_sq"
    if state not in ckpt:
        return None
    return (ckpt.read(state) != 0).any(dim=1)


def stem_table_stats(
    ckpt: OfflineCheckpoint, pairs: int, seed: int = 0, tokens: torch.Tensor | None = None
) -> list[TableStats]:
    """Per STEM table, one table in memory at a time. `tokens` (ids from real text): also the
    spread of the rows that random pairs of distinct tokens of it select."""
    stats = []
    for key in table_keys(ckpt):
        generator = torch.Generator().manual_seed(seed)
        table = ckpt.read(key).double()
        norms = table.norm(dim=1)
        updated = updated_rows(ckpt, key)
        rows = table[updated] if updated is not None else table
        token_spread = None
        if tokens is not None:
            if tokens.numel() and int(tokens.max()) >= table.shape[0]:
                raise ValueError(
                    f"data token id {int(tokens.max())} is outside the {key} table "
                    f"({table.shape[0]} rows): the data uses another tokenizer"
                )
            token_spread = cosine_spread(table[tokens], pairs, generator, labels=tokens)
        stats.append(
            TableStats(
                layer=layer_of(key),
                key=key,
                rows=table.shape[0],
                width=table.shape[1],
                updated=int(updated.sum()) if updated is not None else None,
                norms=norm_summary(norms),
                updated_norms=norm_summary(norms[updated]) if updated is not None else None,
                spread=cosine_spread(rows, pairs, generator),
                token_spread=token_spread,
            )
        )
    return stats


@torch.no_grad()
def dense_up_outputs(
    model: torch.nn.Module, layers: list[int], tokens: torch.Tensor, seq_length: int
) -> dict[int, torch.Tensor]:
    """W_up x at the FFN input of each dense layer in `layers`, for every token of `tokens`
    (run through `model` in sequences of `seq_length`): {layer: [n, d_ff]}, rows in token order."""
    modules = dict(model.named_modules())
    outputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = []
    for layer in layers:
        mlp = modules.get(f"decoder.layers.{layer}.mlp")
        if mlp is None or hasattr(mlp, "stem_table"):
            raise ValueError(f"layer {layer} of the dense checkpoint is not a dense FFN layer")

        def keep_up(module, args, output, layer=layer):
            up = output[0].chunk(2, dim=-1)[1]  # fused [gate; up]: the second half is W_up x
            outputs[layer].append(up.transpose(0, 1).reshape(-1, up.shape[-1]).float())

        hooks.append(mlp.linear_fc1.register_forward_hook(keep_up))
    try:
        usable = tokens[: (tokens.numel() // seq_length) * seq_length]
        if usable.numel() == 0:
            raise ValueError(f"need at least seq_length={seq_length} tokens, got {tokens.numel()}")
        for batch in usable.view(-1, seq_length).split(8):
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: torch.cat(chunks) for layer, chunks in outputs.items()}


def dense_token_spreads(
    model: torch.nn.Module,
    layers: list[int],
    tokens: torch.Tensor,
    seq_length: int,
    pairs: int,
    seed: int = 0,
) -> dict[int, Spread]:
    """Spread of W_up x over random pairs of positions holding distinct tokens, per layer."""
    usable = tokens[: (tokens.numel() // seq_length) * seq_length]
    spreads = {}
    for layer, up in dense_up_outputs(model, layers, tokens, seq_length).items():
        generator = torch.Generator().manual_seed(seed)
        spreads[layer] = cosine_spread(up, pairs, generator, labels=usable)
    return spreads


def validation_tokens(prefix: str, vocab_size: int, count: int) -> torch.Tensor:
    """The first `count` tokens of the indexed dataset at `prefix`."""
    data = open_dataset(prefix, vocab_size=vocab_size)
    return torch.from_numpy(np.asarray(data.tokens[:count], dtype=np.int64))
