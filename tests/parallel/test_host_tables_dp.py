"""Host-resident tables in parallel layouts: two processes joined by gloo train exactly like
the same layout with device tables (losses and every parameter bitwise). DP=2 replicated over
50 steps (the replicas' row-gradient sync runs on the compute device either way), and
interleaved pipelining, where one rank's chunks read micro-batches at different offsets."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.training.short_run import train_steps

STEPS = 50


@pytest.mark.parametrize("steps,extra", [
    (STEPS, []),  # DP=2, replicated tables
    # Interleaved 1F1B: each rank's two chunks read the micro-batches at different offsets,
    # so the prefetcher serves each table its own sequence.
    (10, ["model.num_layers=4", "stem.layers=[0,1,2,3]",
          "model.untie_embeddings_and_output_weights=true",
          "parallel.pipeline_model_parallel_size=2",
          "parallel.virtual_pipeline_model_parallel_size=2"]),
], ids=["dp2-replicated", "pp2-interleaved"])
def test_host_tables_equal_device_tables(small_corpus, tmp_path, steps, extra):
    base = [
        "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=32",
        "model.make_vocab_size_divisible_by=64", "stem.layers=[0,1]",
        "train.micro_batch_size=2", "train.global_batch_size=8", f"train.train_iters={STEPS}",
        "optim.lr_warmup_iters=2", "optim.lr=0.003", "optim.min_lr=0.0003",
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}", f"data.valid_data={small_corpus['val']}",
    ] + extra
    runs = {storage: run_local_workers(2, train_steps, base + [
        f"stem.storage={storage}", f"logging.run_dir={tmp_path / storage}"], steps)
        for storage in ("device", "host")}
    for device, host in zip(runs["device"], runs["host"]):
        assert len(host["losses"]) == steps and host["losses"] == device["losses"]
        assert sorted(host["params"]) == sorted(device["params"])
        for name, value in device["params"].items():
            assert torch.equal(host["params"][name], value), name
