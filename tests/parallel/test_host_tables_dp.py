"""Host-resident tables under data parallelism (`replicated`): two processes joined by gloo
train exactly like two processes with device tables, over 50 steps (losses and every
parameter bitwise; the replicas' row-gradient sync runs on the compute device either way)."""

from __future__ import annotations

import torch

from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.training.short_run import train_steps

STEPS = 50


def test_dp2_host_tables_equal_dp2_device_tables(small_corpus, tmp_path):
    base = [
        "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=32",
        "model.make_vocab_size_divisible_by=64", "stem.layers=[0,1]",
        "train.micro_batch_size=2", "train.global_batch_size=8", f"train.train_iters={STEPS}",
        "optim.lr_warmup_iters=2", "optim.lr=0.003", "optim.min_lr=0.0003",
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}", f"data.valid_data={small_corpus['val']}",
    ]
    runs = {storage: run_local_workers(2, train_steps, base + [
        f"stem.storage={storage}", f"logging.run_dir={tmp_path / storage}"], STEPS)
        for storage in ("device", "host")}
    for device, host in zip(runs["device"], runs["host"]):
        assert len(host["losses"]) == STEPS and host["losses"] == device["losses"]
        assert sorted(host["params"]) == sorted(device["params"])
        for name, value in device["params"].items():
            assert torch.equal(host["params"][name], value), name
