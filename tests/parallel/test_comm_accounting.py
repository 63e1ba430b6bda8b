"""Communication accounting on real gloo processes: STEM adds no tensor-parallel traffic, DDP
moves exactly the dense gradients, the STEM table sync moves rows touched, not the vocab, and
no layout ever issues an all-to-all."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from stem_megatron.config_loader import load_config
from stem_megatron.data.indexed import open_dataset
from stem_megatron.data.sampler import PackedSampleStream
from stem_megatron.parallel.comm_meter import CommMeter
from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.training.short_run import train_steps

FFN = 64  # model.ffn_hidden_size: the width of a table row (TP=1)
DP_STEPS = 2
# Data-parallel runs: 2 micro-batches of 1 x 16 tokens per rank and step, few rows next to
# the 512-row vocab, so the bound below is far from a dense table sync.
DP_BATCH = ["model.seq_length=16", "train.micro_batch_size=1"]


@pytest.fixture(scope="module")
def base(small_corpus, tmp_path_factory):
    return [
        "model.num_layers=2",
        "model.hidden_size=32",
        f"model.ffn_hidden_size={FFN}",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.seq_length=32",
        "model.make_vocab_size_divisible_by=64",
        "stem.layers=[1]",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.train_iters=10",
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
        f"logging.run_dir={tmp_path_factory.mktemp('comm')}",
    ]


def checked_comm(results) -> list[dict[str, float]]:
    """Each rank's comm metrics of the last step, after checking it issued no all-to-all."""
    for rank, result in enumerate(results):
        assert result["comm"]["comm/all_to_all_bytes"] == 0, f"rank {rank} used an all-to-all"
    return [r["comm"] for r in results]


def _all_to_all_worker() -> dict[str, float]:
    """Both all-to-all forms inside the meter, one on the default group, one given the
    data-parallel group positionally."""
    dist.init_process_group("gloo")
    try:
        world = dist.group.WORLD
        meter = CommMeter(dp_group=world, dp_size=dist.get_world_size())
        try:
            with meter.counting():
                dist.all_to_all_single(torch.empty(4), torch.arange(4.0))  # 16 bytes
                dist.all_to_all(
                    [torch.empty(3), torch.empty(3)], [torch.ones(3), torch.ones(3)], world
                )  # 24 bytes
        except RuntimeError as exc:  # gloo before torch 2.7 has no list all-to-all
            if "does not support alltoall" not in str(exc):
                raise
            return {"unsupported": str(exc)}
        return meter.take()
    finally:
        dist.destroy_process_group()


def test_meter_counts_all_to_all():
    """The assertion of `checked_comm` can fail: an all-to-all anywhere would be counted."""
    for comm in run_local_workers(2, _all_to_all_worker):
        if "unsupported" in comm:
            pytest.skip(f"this torch's gloo cannot run the call: {comm['unsupported']}")
        assert comm["comm/all_to_all_bytes"] == 16 + 24
        # The group passed positionally is recognised; the call without one is `other`.
        assert (comm["comm/dp_stem_bytes"], comm["comm/other_bytes"]) == (24, 16)


def test_stem_adds_no_tensor_parallel_traffic(base):
    tp = ["parallel.tensor_model_parallel_size=2"]
    stem = checked_comm(run_local_workers(2, train_steps, base + tp, 2))[0]
    dense = checked_comm(run_local_workers(2, train_steps, base + tp + ["stem.enabled=false"], 2))[
        0
    ]
    assert stem["comm/tp_bytes"] > 0
    assert stem["comm/tp_bytes"] == dense["comm/tp_bytes"]
    assert stem["comm/dp_stem_bytes"] == 0 and stem["comm/dp_dense_bytes"] == 0


def last_step_ids(overrides: list[str], dp_size: int) -> list[list[torch.Tensor]]:
    """The input ids of each micro-batch of the last of DP_STEPS steps, per DP rank, read
    from the training data with the trainer's sampler and the run's seed."""
    config = load_config(None, overrides)
    tokens = open_dataset(config.data.train_data).tokens
    t = config.train
    per_step = t.global_batch_size // (t.micro_batch_size * dp_size)
    ids = []
    for rank in range(dp_size):
        stream = PackedSampleStream(
            tokens,
            config.model.seq_length,
            t.micro_batch_size,
            seed=t.seed,
            dp_rank=rank,
            dp_size=dp_size,
        )
        batches = [next(stream) for _ in range(DP_STEPS * per_step)][-per_step:]
        ids.append([b[:, :-1].reshape(-1) for b in batches])
    return ids


def vocab_sharded_bounds(ids: list[list[torch.Tensor]]) -> tuple[int, int, int]:
    """(lower, upper) bytes one rank moves for one table's lookups in a step, and the step's
    union of rows. Per micro-batch, with U its union over the W ranks: the id exchange (a
    count and the longest rank's unique ids, int64); the row all-gather sends this rank's
    padded segment and the reduce-scatter W of them, a segment being the longest owner's
    share of U (>= U / W, <= U) of FFN fp32 values. Plus per step the two scalar all-reduces
    of the table gradient norm (fp32) and the unique-row count (int64)."""
    world = len(ids)
    lower = upper = 4 + 8
    step_union = set()
    for micro in zip(*ids):
        unique = [set(m.tolist()) for m in micro]
        union = set().union(*unique)
        step_union |= union
        ids_bytes = 8 + 8 * max(len(u) for u in unique)
        lower += ids_bytes + (1 + world) * -(-len(union) // world) * FFN * 4
        upper += ids_bytes + (1 + world) * len(union) * FFN * 4
    return lower, upper, len(step_union)


@pytest.mark.parametrize("layout", ["replicated", "vocab_sharded"])
def test_data_parallel_bytes(base, layout):
    overrides = base + DP_BATCH + [f"stem.dp_layout={layout}"]
    results = run_local_workers(2, train_steps, overrides, DP_STEPS)
    counts = results[0]["counts"]
    union = results[0]["unique_rows"]
    # A dense table-gradient sync all-reduces every row of the table: V x d_ff x 4 bytes.
    dense_table_sync = 4 * (
        sum(r["counts"]["table_params"] for r in results)
        if layout == "vocab_sharded"
        else counts["table_params"]
    )
    if layout == "replicated":
        # One table: the all-reduce of [union rows, FFN] fp32, plus the id exchange (a count
        # and at most `union` int64 ids).
        lower, upper = 4 * union * FFN, 4 * union * FFN + 8 * (union + 1)
    else:
        lower, upper, step_union = vocab_sharded_bounds(last_step_ids(overrides, 2))
        assert step_union == union  # the data read here is what the trainer looked up
    assert upper < dense_table_sync / 2
    for comm in checked_comm(results):
        # DDP all-reduces each dense gradient once per step, fp32.
        assert comm["comm/dp_dense_bytes"] == 4 * counts["dense_params"]
        assert comm["comm/tp_bytes"] == 0 and comm["comm/pp_bytes"] == 0
        assert lower <= comm["comm/dp_stem_bytes"] <= upper
        assert comm["comm/dp_stem_bytes"] < dense_table_sync / 4
    stem_bytes = results[0]["comm"]["comm/dp_stem_bytes"]
    print(
        f"{layout}: {union} rows, dp-stem {stem_bytes:,.0f} bytes in [{lower:,}, {upper:,}], "
        f"{stem_bytes / dense_table_sync:.3f} of a dense table sync ({dense_table_sync:,})"
    )


def test_pipeline_sends_activations_and_gradients(base):
    results = run_local_workers(
        2,
        train_steps,
        base
        + [
            "parallel.pipeline_model_parallel_size=2",
            "model.untie_embeddings_and_output_weights=true",
        ],
        1,
    )
    # 2 micro-batches of [seq 32, batch 2, hidden 32] fp32: stage 0 sends activations forward,
    # stage 1 sends their gradients back.
    per_microbatch = 32 * 2 * 32 * 4
    assert [c["comm/pp_bytes"] for c in checked_comm(results)] == [2 * per_microbatch] * 2
