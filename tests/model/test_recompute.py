"""Activation recomputation (model/recompute.py): the same loss and gradients as without it
(dense and table rows, device and host tables), one prefetched slot and one row-gradient add
per table and micro-batch, and fewer saved activations. Through the trainer, with pipeline
parallelism and host tables: tests/parallel/test_equivalence.py's recompute cases."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.config import ModelConfig
from stem_megatron.model.recompute import recompute_groups
from stem_megatron.model.transformer import ModelSpec, StemGPTModel, megatron_config
from stem_megatron.parallel.state import ParallelState
from stem_megatron.stem.prefetch import RowPrefetcher, RowRequest

VOCAB = 100
SETTINGS = {
    "off": {},
    "full-uniform-1": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    ),
    "full-uniform-3": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3
    ),  # groups [0, 3) and [3, 4)
    "full-block-2": dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=2
    ),
    "selective": dict(recompute_granularity="selective"),
}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    parallel = ParallelState.initialize()
    yield parallel
    parallel.destroy()


def build(setting: str, host_tables: bool = False, bf16: bool = False) -> StemGPTModel:
    m = ModelConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=32,
        make_vocab_size_divisible_by=64,
        **SETTINGS[setting],
    )
    model = StemGPTModel(ModelSpec(model=m, vocab_size=VOCAB, stem_layers=(1, 3), bf16=bf16))
    if host_tables:
        for table in model.stem_tables().values():
            table.move_to_host("cpu")
    model.init_parameters(7)
    if bf16:  # Megatron's bf16: dense weights in bf16, tables keep fp32 rows
        for name, param in model.named_parameters():
            if "stem_table" not in name:
                param.data = param.data.bfloat16()
    return model


def micro_batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (2, 33), generator=g) for _ in range(n)]


def train_step(model: StemGPTModel, batches: list[torch.Tensor]):
    """Forward and backward over the micro-batches (host tables: staged by a RowPrefetcher,
    as the trainer does). Returns losses, dense grads, table row grads and the counts."""
    prefetcher = None
    if any(t.on_host for t in model.stem_tables().values()):
        prefetcher = RowPrefetcher(
            {n: t.weight for n, t in model.stem_tables().items()}, torch.device("cpu")
        )
        for name, table in model.stem_tables().items():
            table.connect(None, prefetcher, name)
        prefetcher.start([RowRequest.of_ids(b[:, :-1]) for b in batches])
    losses = []
    for tokens in batches:
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
        loss.backward()
        losses.append(loss.detach())
    served = None
    if prefetcher is not None:
        served = dict(prefetcher._served)
        prefetcher.finish()  # every table looked up exactly once per micro-batch
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    tables = model.stem_tables()
    grads.update({n: t.grad_accumulator.reduce() for n, t in tables.items()})
    adds = {n: t.grad_accumulator.adds for n, t in tables.items()}
    return torch.stack(losses), grads, adds, served


def assert_same(a, b) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s != "off"])
def test_recompute_gives_the_same_loss_and_gradients(setting):
    batches = micro_batches(2)
    losses, grads, adds, _ = train_step(build(setting), batches)
    ref_losses, ref_grads, ref_adds, _ = train_step(build("off"), batches)
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-6)
    assert_same(grads, ref_grads)
    assert adds == ref_adds == {n: 2 for n in adds}  # one add per micro-batch


@pytest.mark.parametrize("setting", ["full-uniform-1", "selective"])
def test_recompute_in_bf16_gives_the_same_loss_and_gradients(setting):
    batches = micro_batches(2)
    losses, grads, _, _ = train_step(build(setting, bf16=True), batches)
    ref_losses, ref_grads, _, _ = train_step(build("off", bf16=True), batches)
    assert grads["decoder.layers.0.mlp.linear_fc1.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
    assert_same(grads, ref_grads)


@pytest.mark.parametrize("setting", ["full-uniform-1", "selective"])
def test_host_tables_take_one_slot_per_micro_batch_when_recomputed(setting):
    """Host tables read rows the prefetcher staged in slots reused two micro-batches later; the
    recompute reads the rows its first run staged, not the next slot (which would serve it
    another micro-batch's rows, or fail the order check)."""
    batches = micro_batches(3)
    losses, grads, adds, served = train_step(build(setting, host_tables=True), batches)
    ref_losses, ref_grads, ref_adds, ref_served = train_step(
        build("off", host_tables=True), batches
    )
    assert served == ref_served == {n: 3 for n in served}
    assert adds == ref_adds == {n: 3 for n in adds}
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-6)
    assert_same(grads, ref_grads)
    # and the same as device tables
    assert_same(grads, train_step(build("off"), batches)[1])


def saved_bytes(model: StemGPTModel, tokens: torch.Tensor) -> int:
    """Bytes of the activations the forward keeps for the backward (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
    loss.backward()
    return sum(seen.values())


def test_recompute_keeps_fewer_activations():
    tokens = micro_batches(1)[0]
    saved = {s: saved_bytes(build(s), tokens) for s in SETTINGS}
    print({s: f"{b / 1024:.0f} KiB" for s, b in saved.items()})
    # Full recompute of every layer keeps one [s, b, h] input per layer (+ ids and RoPE
    # tables) in place of every layer's activations.
    assert saved["full-uniform-1"] < 0.35 * saved["off"]
    assert saved["full-uniform-3"] < saved["full-uniform-1"]  # two groups, two inputs
    assert saved["full-uniform-1"] < saved["full-block-2"] < saved["off"]
    assert saved["selective"] < saved["off"]


def test_recompute_groups_follow_megatron():
    def config(method, n):
        m = ModelConfig(
            num_layers=5,
            recompute_granularity="full",
            recompute_method=method,
            recompute_num_layers=n,
        )
        return megatron_config(ModelSpec(model=m, vocab_size=VOCAB, stem_layers=()))

    assert recompute_groups(5, config("uniform", 2)) == [(0, 2, True), (2, 4, True), (4, 5, True)]
    assert recompute_groups(5, config("block", 2)) == [
        (0, 1, True),
        (1, 2, True),
        (2, 3, False),
        (3, 4, False),
        (4, 5, False),
    ]


def test_only_training_recomputes():
    """Megatron recomputes in training only: in eval mode layer 0 runs once per forward even
    with autograd on; in training it runs again in the backward."""
    model = build("full-uniform-1")
    layer = model.decoder.layers["0"]
    tokens = micro_batches(1)[0]
    runs = []
    handle = layer.register_forward_hook(lambda *_: runs.append(model.training))
    for training in (False, True):
        model.train(training)
        model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
    handle.remove()
    assert runs == [False, True, True]
