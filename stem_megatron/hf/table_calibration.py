"""An optional initialisation of imported STEM tables: the dense model's own up-projection,
averaged per token over calibration text.

In a STEM layer the up-projection `W_up x` becomes a row `U[t]` that depends only on the
token t at that position. The constant that best replaces `W_up x` over the positions of
token t (least squares) is its mean there:

    U_l[t] = mean over positions p with token t of  W_up,l  RMSNorm_l(h_l,p)

where h_l,p is the dense model's residual stream entering layer l's FFN. Tokens that never
occur in the calibration data get the mean over all positions (the best constant without
the token). The STEM model then starts close to the dense one instead of from xavier noise
(the paper's choice and our default); benchmarks/RESULTS.md records the measured effect.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from stem_megatron.config import ModelConfig
from stem_megatron.model.transformer import ModelSpec, StemGPTModel


@torch.no_grad()
def calibrated_tables(
    dense_weights: dict[str, torch.Tensor],
    m: ModelConfig,
    vocab_size: int,
    stem_layers: list[int],
    tokens: np.ndarray,
    max_tokens: int,
    batch_size: int = 8,
    log: Callable[[str], None] = print,
) -> dict[int, torch.Tensor]:
    """{layer: [vocab, d_ff] table} from the dense model (`dense_weights`: every layer with
    its [gate; up] fc1) run over the first `max_tokens` of `tokens` in model.seq_length
    windows."""
    seq = m.seq_length
    windows = min(max_tokens, len(tokens)) // seq
    if windows == 0:
        raise ValueError(
            f"calibration needs at least model.seq_length ({seq}) tokens, the "
            f"data has {len(tokens)}"
        )
    model = StemGPTModel(ModelSpec(model=m, vocab_size=vocab_size, stem_layers=()))
    missing, unexpected = model.load_state_dict(dense_weights, strict=False)
    if [n for n in missing if not n.endswith("_extra_state")] or unexpected:
        raise RuntimeError(f"dense weights do not fit the dense model: {missing}, {unexpected}")
    model.eval()
    d_ff = m.ffn_hidden_size
    sums = {layer: torch.zeros(vocab_size, d_ff, dtype=torch.float64) for layer in stem_layers}
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    batch_ids: list[torch.Tensor] = []  # the [s, b] ids of the forward being run

    def collect(layer: int):
        def hook(_module, _inputs, output):
            up = output[0][..., d_ff:]  # fc1 is [gate; up]
            sums[layer].index_add_(0, batch_ids[0].reshape(-1), up.reshape(-1, d_ff).double())

        return hook

    hooks = [
        model.decoder.layers[str(layer)].mlp.linear_fc1.register_forward_hook(collect(layer))
        for layer in stem_layers
    ]
    data = torch.from_numpy(np.asarray(tokens[: windows * seq], dtype=np.int64)).view(windows, seq)
    log(f"calibrating tables of layers {stem_layers} on {windows * seq} tokens")
    try:
        for start in tqdm(
            range(0, windows, batch_size), desc="calibration", unit="batch", disable=None
        ):
            ids = data[start : start + batch_size]
            batch_ids[:] = [ids.t()]  # hidden states are [s, b, h]
            counts.index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.float64))
            model(ids)
    finally:
        for handle in hooks:
            handle.remove()
    seen = counts > 0
    tables = {}
    for layer, total in sums.items():
        table = total.sum(0, keepdim=True).div(counts.sum()).expand(vocab_size, d_ff).clone()
        table[seen] = total[seen] / counts[seen, None]
        tables[layer] = table.float()
    log(f"calibration: {int(seen.sum())} of {vocab_size} tokens seen; the rest get the mean row")
    return tables
