"""Sequence parallelism at the model level: TP=2 with SP, TP=2 without, and one process give
the same loss and gradients (dense, RMSNorm after the TP sum finalize_model_grads does, and
table rows), with recomputation too; the STEM lookup adds no bytes; SP is what runs
(activations between layers hold s/TP tokens). Through the trainer (with pipeline
parallelism): tests/parallel/test_equivalence.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from stem_megatron.parallel.local_workers import run_local_workers

VOCAB, SEQ, RTOL = 100, 16, 1e-5


def _model(tp: int, sequence_parallel: bool, recompute: str | None, stem_layers):
    from stem_megatron.config import ModelConfig
    from stem_megatron.model.transformer import ModelSpec, StemGPTModel

    m = ModelConfig(
        num_layers=3,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=SEQ,
        make_vocab_size_divisible_by=64,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
    )
    spec = ModelSpec(
        model=m,
        vocab_size=VOCAB,
        stem_layers=stem_layers,
        tp_size=tp,
        tp_rank=dist.get_rank() % tp,
        sequence_parallel=sequence_parallel,
    )
    model = StemGPTModel(spec)  # tied embedding and head
    model.init_parameters(7)
    return model


def _full(local: torch.Tensor, shard, group) -> torch.Tensor:
    from stem_megatron.sharding import gather_full

    if shard is None or dist.get_world_size(group) == 1:
        return local.clone()
    slices = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(slices, local.contiguous(), group=group)
    return gather_full(slices, shard)


def _loss_and_grads(
    tp: int, sequence_parallel: bool, recompute: str | None, stem_layers: tuple[int, ...]
) -> dict:
    from megatron.core import parallel_state

    from stem_megatron.parallel.comm_meter import CommMeter
    from stem_megatron.sharding import TPShard, get_tp_shard

    group = parallel_state.get_tensor_model_parallel_group()
    model = _model(tp, sequence_parallel, recompute, stem_layers)
    seen = []
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(3))
    meter = CommMeter(tp_group=group)
    with meter.counting():
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
        loss.backward()
    tp_bytes = meter.take()
    # SP: each rank's norm weights saw its s/TP tokens; finalize_model_grads sums them over TP.
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False):
            dist.all_reduce(param.grad, group=group)
    grads = {
        n: _full(p.grad, get_tp_shard(p), group)
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    for name, table in model.stem_tables().items():
        ids, rows = table.grad_accumulator.reduce()
        rows = _full(rows, TPShard(dim=1), group)
        grads[name] = rows.new_zeros(VOCAB, rows.shape[1]).index_copy_(0, ids, rows)
    if sequence_parallel:  # refused before any collective: one rank cannot hang the others
        with pytest.raises(ValueError, match="must divide them"):
            model(tokens[:, : SEQ - 1])
    marked = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", 0))
    return {
        "loss": loss.detach(),
        "grads": grads,
        "layer_tokens": seen,
        "marked": marked,
        "comm": tp_bytes,
    }


def _worker(tp: int, cases: list[tuple]) -> list[dict]:
    from stem_megatron.parallel.state import ParallelState

    parallel = ParallelState.initialize(tp_size=tp)
    try:
        return [_loss_and_grads(tp, *case) for case in cases]
    finally:
        parallel.destroy()


STEM, DENSE = (1, 2), ()
# (sequence parallel, recompute granularity, STEM layers); the last: the dense baseline
CASES = [
    (False, None, STEM),
    (True, None, STEM),
    (True, "full", STEM),
    (True, "selective", STEM),
    (True, None, DENSE),
]


@pytest.fixture(scope="module")
def runs():
    (single,) = run_local_workers(1, _worker, 1, [(False, None, STEM)])
    return single[0], run_local_workers(2, _worker, 2, CASES)


def _assert_close(result: dict, reference: dict) -> float:
    worst = ((result["loss"] - reference["loss"]).abs() / reference["loss"].abs()).item()
    assert sorted(result["grads"]) == sorted(reference["grads"])
    for name, ref in reference["grads"].items():
        rel = ((result["grads"][name] - ref).norm() / ref.norm()).item()
        assert rel <= RTOL, f"{name}: relative difference {rel:.2e}"
        worst = max(worst, rel)
    assert worst <= RTOL
    return worst


@pytest.mark.parametrize(
    "case", range(len(CASES) - 1), ids=[f"sp={sp}-recompute={r}" for sp, r, _ in CASES[:-1]]
)
def test_tp2_matches_single_process(runs, case):
    single, ranks = runs
    for rank in ranks:
        worst = _assert_close(rank[case], single)
        print(f"{CASES[case]}: worst relative difference {worst:.2e}")


def test_sequence_parallel_runs_on_a_slice_of_the_sequence(runs):
    single, ranks = runs
    for rank in ranks:
        without, with_sp = rank[0], rank[1]
        assert without["layer_tokens"] == [SEQ] * 3 and without["marked"] == []
        assert with_sp["layer_tokens"] == [SEQ // 2] * 3  # layer outputs [s/TP, b, h]
        assert with_sp["marked"] == sorted(n for n in single["grads"] if "layernorm" in n)


def test_stem_lookup_adds_no_bytes_under_sequence_parallel(runs):
    """The STEM model moves exactly the dense baseline's TP bytes, collective by collective
    (fc1 is half as wide, but its gather is of its input): every rank has all the ids and
    reads its d_ff/TP columns for the gathered sequence."""
    _, ranks = runs
    for rank in ranks:
        stem, dense = rank[1]["comm"], rank[-1]["comm"]
        print("SP STEM:", stem, "SP dense:", dense, "TP STEM without SP:", rank[0]["comm"])
        assert stem["comm/tp_bytes"] > 0
        assert stem == dense
