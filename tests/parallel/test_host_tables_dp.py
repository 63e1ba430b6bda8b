"""Host-resident tables in parallel layouts: two processes joined by gloo train exactly like
the same layout with device tables (losses and every parameter bitwise). DP=2 over 50 steps in
both table layouts, with and without the hot-row cache (replicated: the replicas' row-gradient
sync runs on the compute device either way; vocab-sharded: each rank stages only the rows it
owns of the union, after an id exchange the trainer runs before the schedule), and interleaved
pipelining, where one rank's chunks read micro-batches at different offsets."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.training.short_run import train_steps

STEPS = 50


@pytest.mark.parametrize(
    "steps,extra",
    [
        (STEPS, []),  # DP=2, replicated tables
        (STEPS, ["stem.dp_layout=vocab_sharded"]),
        (STEPS, ["stem.dp_layout=vocab_sharded", "stem.optimizer.mode=exact"]),
        # No clipping: host-table updates start during the backward (stem/overlap.py).
        (20, ["stem.dp_layout=vocab_sharded", "optim.clip_grad=0"]),
        # Interleaved 1F1B: each rank's two chunks read the micro-batches at different offsets,
        # so the prefetcher serves each table its own sequence.
        (
            10,
            [
                "model.num_layers=4",
                "stem.layers=[0,1,2,3]",
                "model.untie_embeddings_and_output_weights=true",
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
            ],
        ),
    ],
    ids=[
        "dp2-replicated",
        "dp2-vocab-sharded",
        "dp2-vocab-sharded-exact",
        "dp2-vocab-sharded-overlapped-update",
        "pp2-interleaved",
    ],
)
def test_host_tables_equal_device_tables(small_corpus, tmp_path, steps, extra):
    base = [
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.ffn_hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.seq_length=32",
        "model.make_vocab_size_divisible_by=64",
        "stem.layers=[0,1]",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        f"train.train_iters={STEPS}",
        "optim.lr_warmup_iters=2",
        "optim.lr=0.003",
        "optim.min_lr=0.0003",
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
    ] + extra
    variants = {"device": ["stem.storage=device"], "host": ["stem.storage=host"]}
    if "parallel.pipeline_model_parallel_size=2" not in extra:  # the cache at DP=2
        variants["host_cache"] = ["stem.storage=host", "stem.cache_rows=64"]
    runs = {
        name: run_local_workers(
            2, train_steps, base + overrides + [f"logging.run_dir={tmp_path / name}"], steps
        )
        for name, overrides in variants.items()
    }
    if "stem.dp_layout=vocab_sharded" in extra:
        # Host tables exchange a micro-batch's ids once for all tables, before the schedule;
        # device tables once per table lookup: fewer bytes, the same row traffic otherwise.
        for device, host in zip(runs["device"], runs["host"]):
            assert 0 < host["comm"]["comm/dp_stem_bytes"] < device["comm"]["comm/dp_stem_bytes"]
    for name in variants:
        for device, other in zip(runs["device"], runs[name]):
            assert len(other["losses"]) == steps and other["losses"] == device["losses"], name
            assert sorted(other["params"]) == sorted(device["params"])
            for param, value in device["params"].items():
                assert torch.equal(other["params"][param], value), (name, param)
