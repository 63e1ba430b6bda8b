"""The dry run: every rank's shard of the real model built on meta, counts that add up to the
model, the paper's 1B figures, and the two command-line entry points."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stem_megatron.config_loader import load_config
from stem_megatron.parallel.dims import ParallelDims
from stem_megatron.pipeline_split import pipeline_stages
from stem_megatron.planning.dry_run import build_rank_shard, dry_run
from stem_megatron.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]


WHOLE_MODEL = (
    "parallel.tensor_model_parallel_size=1",
    "parallel.pipeline_model_parallel_size=1",
    "parallel.sequence_parallel=false",
)


def config(name: str, *overrides: str):
    return load_config(ROOT / "configs" / f"{name}.yaml", list(overrides))


def test_stem_1b_matches_the_papers_counts():
    report = dry_run(config("stem_1b"), world_size=64)
    assert (report.layout.tp_size, report.layout.pp_size, report.layout.dp_size) == (2, 1, 32)
    assert report.stem_layers == (1, 4, 7, 10, 13)
    # Paper: 6.75B total, 1.41B active. Ours: 6.668B (the paper's figure is ours plus the five
    # removed up-projections, 5 x 2048 x 8192) and 1.415B.
    assert abs(report.counts.total_params / 6.75e9 - 1) < 0.02
    assert abs(report.counts.active_params / 1.41e9 - 1) < 0.02


@pytest.mark.parametrize(
    "name,world_size,overrides",
    [
        ("stem_1b", 64, []),
        ("dense_1b", 8, ["parallel.tensor_model_parallel_size=2"]),  # tied head under TP
        ("stem_7b", 64, []),
        ("stem_30b", 128, []),
        ("stem_30b", 32, ["parallel.pipeline_layers=[10,14,14,10]"]),
        ("stem_350m", 8, ["parallel.pipeline_model_parallel_size=2"]),  # tied across stages
    ],
)
def test_per_rank_sums_equal_the_model(name, world_size, overrides):
    c = config(name, *overrides)
    report = dry_run(c, world_size)
    tp, pp = report.layout.tp_size, report.layout.pp_size
    assert len(report.ranks) == tp * pp
    dense, tables = report.replica_sums()
    assert tables == report.counts.table_params
    assert dense + tables == report.counts.total_params
    # Norms are whole on every TP rank: counted once per TP rank over the replica.
    h, layers = c.model.hidden_size, c.model.num_layers
    assert sum(r.params.replicated for r in report.ranks) == tp * (2 * h * layers + h)
    # A tied embedding under PP: the last stage holds a copy of the first stage's shard.
    tied_across_stages = pp > 1 and not c.model.untie_embeddings_and_output_weights
    for r in report.ranks:
        copy = report.padded_vocab_size // tp * h if tied_across_stages and r.stage == pp - 1 else 0
        assert r.params.tied_copy == copy
    # Tables: the full [vocab, d_ff] of each STEM layer, split by columns over TP.
    for r in report.ranks:
        assert r.params.table_shapes == (
            (c.model.vocab_size, c.model.ffn_hidden_size // tp),
        ) * len(r.stem_layers)


def test_meta_build_allocates_nothing():
    # 42B parameters: 157 GiB in fp32 if anything were allocated
    c = config("stem_30b", *WHOLE_MODEL)
    stage = pipeline_stages(c.model.num_layers, 1)[0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_rank_shard(ParallelDims(c, 1, c.model.vocab_size).model_spec(stage, tp_rank=0))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) > 42e9
    assert grown_kib < 512 * 1024


def test_rank_shards_have_megatrons_per_rank_shapes():
    c = config("stem_30b")  # TP 8: 64 heads, 8 KV groups, head dim 128, d_ff 22016
    first, second, *_ = pipeline_stages(48, 4)
    dims = ParallelDims(c, 32, 32000)  # one replica: TP 8 x PP 4
    model = build_rank_shard(dims.model_spec(first, tp_rank=5))
    params = dict(model.named_parameters())
    assert params["embedding.word_embeddings.weight"].shape == (4000, 8192)
    assert model.embedding.word_embeddings.vocab_start_index == 5 * 4000
    assert params["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (
        (64 + 2 * 8) * 128 // 8,
        8192,
    )
    assert params["decoder.layers.0.self_attention.linear_proj.weight"].shape == (8192, 1024)
    assert params["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 2752, 8192)
    assert params["decoder.layers.1.mlp.linear_fc1.weight"].shape == (2752, 8192)
    assert params["decoder.layers.1.mlp.stem_table.weight"].shape == (32000, 2752)
    assert params["decoder.layers.1.mlp.linear_fc2.weight"].shape == (8192, 2752)
    assert "output_layer.weight" not in params
    last = build_rank_shard(dims.model_spec(pipeline_stages(48, 4)[3], tp_rank=7))
    names = dict(last.named_parameters())
    assert names["output_layer.weight"].shape == (4000, 8192)
    assert "embedding.word_embeddings.weight" not in names
    assert min(int(n.split(".")[2]) for n in names if n.startswith("decoder.layers")) == 36
    middle = dict(build_rank_shard(dims.model_spec(second, 0)).named_parameters())
    assert not any(n.startswith(("embedding", "output_layer", "decoder.final")) for n in middle)


def test_uneven_pipeline_split_in_the_report():
    report = dry_run(config("stem_30b", "parallel.pipeline_layers=[10,14,14,10]"), 32)
    assert [len(s.layers) for s in report.layout.stages] == [10, 14, 14, 10]
    assert report.layout.stages[1].layers[0] == 10
    first, last = report.ranks[0].memory, report.ranks[-1].memory
    assert (first.passes_in_flight, last.passes_in_flight) == (4, 1)


def test_train_dry_run_prints_the_table(capsys):
    assert (
        train_main(
            ["--config", str(ROOT / "configs/stem_1b.yaml"), "--dry-run", "--world-size", "64"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "world 64 = TP 2 x PP 1 x DP 32" in out
    assert "6.67B total / 1.41B active" in out
    assert "(equals the model total)" in out
    assert "pp 0 / tp 0-1" in out
    assert "storage device" in out and "-- in host RAM --" not in out


def test_train_dry_run_refuses_a_bad_layout(capsys):
    assert (
        train_main(
            ["--config", str(ROOT / "configs/stem_1b.yaml"), "--dry-run", "--world-size", "63"]
        )
        == 2
    )
    assert (
        "world size 63 is not divisible by tensor_model_parallel_size (2)"
        in capsys.readouterr().err
    )
    assert not torch.distributed.is_initialized()


def test_estimate_memory_tool_writes_json(tmp_path):
    out = tmp_path / "mem.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/estimate_memory.py"),
            "--config",
            str(ROOT / "configs/stem_7b.yaml"),
            "--world-size",
            "64",
            "--json",
            str(out),
            "train.micro_batch_size=2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pp 1 / tp 0-3" in proc.stdout
    data = json.loads(out.read_text())
    assert data["layout"] == {
        "world_size": 64,
        "tp": 4,
        "pp": 2,
        "dp": 8,
        "vp": 1,
        "stages": [list(range(16)), list(range(16, 32))],
    }
    assert data["num_microbatches"] == 1024 // (2 * 8)
    assert len(data["ranks"]) == 8
    assert sum(r["params"]["tables"] for r in data["ranks"]) == data["counts"]["table_params"]
    rank = data["ranks"][0]["memory_bytes"]
    tables = rank["tables"]
    assert tables["storage"] == "device"
    dense = rank["dense"]
    assert rank["device_total"] == (
        dense["weights"]
        + dense["grads"]
        + dense["main_params"]
        + dense["optimizer"]
        + tables["weights"]
        + tables["optimizer"]
        + tables["step_counters"]
        + tables["row_grads"]
        + tables["grad_transient"]
        + max(rank["activations"], dense["main_grads"])
    )
    assert rank["host_total"] == rank["mmap_total"] == 0


@pytest.mark.parametrize("name,world_size", [("stem_1b", 64), ("stem_7b", 64), ("stem_30b", 128)])
def test_large_configs_run_as_megatron_users_do_and_fit_80gb(name, world_size):
    """bf16 with fp32 main params, the distributed optimizer, SP wherever TP > 1, and every
    rank within an 80 GB GPU by the dry run (recomputation would be added where it did not)."""
    c = config(name)
    assert c.train.bf16 and c.optim.use_distributed_optimizer
    assert c.parallel.sequence_parallel == (c.parallel.tensor_model_parallel_size > 1)
    report = dry_run(c, world_size)
    assert max(r.memory.device_total for r in report.ranks) < 80e9
