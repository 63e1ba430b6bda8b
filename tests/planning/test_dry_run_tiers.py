"""The dry run follows the STEM table layout (vocab_sharded rows per DP rank), the storage tier
(device / host / mmap totals) and interleaved pipelines (several model chunks per rank), as
training builds them."""

from __future__ import annotations

from pathlib import Path

import pytest

from stem_megatron.config_loader import load_config
from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.pipeline_split import PipelineStage
from stem_megatron.planning.activation_memory import ActivationSetup, chunk_activations
from stem_megatron.planning.dry_run import build_rank_shard, dry_run, run_dry_run
from stem_megatron.planning.memory import count_shard
from stem_megatron.sharding import RowBlock

ROOT = Path(__file__).resolve().parents[2]
STEM_1B = ROOT / "configs" / "stem_1b.yaml"
V, TABLES, WIDTH = 128256, 5, 4096  # stem_1b's vocab and STEM layers; d_ff 8192 over TP 2
# A tiny model that really trains on 4 CPU processes: 8 layers, 4 of them STEM, vocab 1001
# (two DP blocks of 501 and 500 rows).
TINY = [
    "model.num_layers=8",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.seq_length=16",
    "model.vocab_size=1001",
    "model.make_vocab_size_divisible_by=8",
    "stem.layers=[1,2,5,6]",
    "parallel.tensor_model_parallel_size=1",
    "parallel.sequence_parallel=false",
    "parallel.pipeline_model_parallel_size=2",
    "parallel.virtual_pipeline_model_parallel_size=2",
    "stem.dp_layout=vocab_sharded",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "train.bf16=false",
]


def stem_1b(world: int, *overrides: str):
    return dry_run(load_config(STEM_1B, list(overrides)), world)


def only(report):
    """The one rank type of a stem_1b report (TP ranks 0 and 1 agree)."""
    first, second = report.ranks
    assert (first.params, first.memory) == (second.params, second.memory)
    return first


def test_vocab_sharded_ranks_hold_their_row_block():
    # DP 5 does not divide 128256: blocks of 25652 rows on DP ranks 0-3 and 25648 on rank 4.
    replicated = stem_1b(10, "train.global_batch_size=520")
    sharded = stem_1b(10, "train.global_batch_size=520", "stem.dp_layout=vocab_sharded")
    full = replicated.ranks[0].memory.tables
    assert [r.dp_ranks for r in replicated.ranks] == [(0, 1, 2, 3, 4)] * 2  # tp 0 and 1
    assert [r.dp_ranks for r in sharded.ranks] == [(0, 1, 2, 3), (4,)] * 2
    total_weights = 0
    for rank in sharded.ranks:
        blocks = {RowBlock.of(V, d, 5) for d in rank.dp_ranks}
        rows = {b.end - b.start for b in blocks}
        assert len(rows) == 1
        (rows,) = rows
        assert rank.params.table_shapes == ((rows, WIDTH),) * TABLES
        mem = rank.memory.tables
        assert mem.weights == TABLES * rows * WIDTH * 4
        assert mem.weights * V == full.weights * rows  # exactly the block's share
        assert mem.optimizer * V == full.optimizer * rows
        assert rank.memory.dense == replicated.ranks[0].memory.dense
        if rank.tp_rank == 0:
            total_weights += mem.weights * len(rank.dp_ranks)
    assert total_weights == full.weights  # the blocks cover every row once
    dense, tables = sharded.replica_sums()
    assert tables == sharded.counts.table_params
    assert dense + tables == sharded.counts.total_params


def test_vocab_sharded_at_world_64_divides_tables_by_dp():
    replicated = only(stem_1b(64))
    sharded = only(stem_1b(64, "stem.dp_layout=vocab_sharded"))
    assert sharded.dp_ranks == tuple(range(32))  # 128256 = 32 x 4008
    rep, sh = replicated.memory.tables, sharded.memory.tables
    assert (sh.weights * 32, sh.optimizer * 32) == (rep.weights, rep.optimizer)
    # Row-gradient chunks are this rank's rows of each micro-batch's union (4008 rows each),
    # merged once they pass twice a merge's rows: 2 x 4008 held, not 8 chunks, nor the vocab.
    assert sh.row_grads == TABLES * 2 * 4008 * WIDTH * 4
    assert rep.row_grads == TABLES * V * WIDTH * 4
    assert sharded.memory.device_total < replicated.memory.device_total


@pytest.mark.parametrize("extra", [[], ["stem.optimizer.mode=exact", "stem.cache_rows=4096"]])
def test_host_and_mmap_tiers_move_tables_off_the_device(extra):
    device = only(stem_1b(64, *extra[:1]))
    host = only(stem_1b(64, "stem.storage=host", *extra))
    mmap = only(stem_1b(64, "stem.storage=mmap", *extra))
    exact, cache = bool(extra), 4096 if extra else 0
    weights = TABLES * V * WIDTH * 4
    counters = TABLES * V * 8 if exact else 0
    resident = weights + 2 * weights + counters
    d = device.memory.tables
    assert (d.weights, d.optimizer + d.step_counters) == (weights, 2 * weights + counters)
    assert device.memory.host_total == device.memory.mmap_total == 0
    # Off the device: two staging slots per table of the largest micro-batch's uncached rows
    # (2 x 4096 ids, rounded to 256), a cache of `cache` rows plus its id -> slot map.
    staging = TABLES * 2 * 8192 * WIDTH * 4
    cache_device = TABLES * cache * WIDTH * 4 + (V * 8 if cache else 0)
    moved = device.memory.device_total - resident + staging + cache_device
    assert host.memory.device_total == mmap.memory.device_total == moved
    # Each table's synced gradient (the union over 32 DP ranks: every row) goes to the host.
    update_copy = V * WIDTH * 4
    host_side = staging + update_copy + (V * 8 if cache else 0)
    assert host.memory.host_total == resident + host_side
    assert host.memory.mmap_total == 0
    assert mmap.memory.mmap_total == 3 * weights  # table and moments are mapped
    assert mmap.memory.host_total == counters + host_side  # exact mode's steps stay in RAM


def test_storage_tiers_in_the_printed_report(capsys, tmp_path):
    config = load_config(STEM_1B, ["stem.storage=mmap"])
    assert run_dry_run(config, 64) == 0
    out = capsys.readouterr().out
    assert "storage mmap" in out
    for line in (
        "-- on the device --",
        "STEM staging buffers (2 per table)",
        "device total",
        "-- in host RAM --",
        "host total",
        "-- in mmap files on disk --",
        "mmap total",
    ):
        assert line in out
    device_part = out.split("-- in host RAM --")[0]
    assert "STEM tables (fp32)" not in device_part


def test_json_output_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mem.json"
    out.write_text("keep")
    assert run_dry_run(load_config(STEM_1B), 64, out) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "keep"


def test_interleaved_rank_params_are_its_chunks():
    config = load_config(
        ROOT / "configs" / "stem_7b.yaml", ["parallel.virtual_pipeline_model_parallel_size=2"]
    )
    report = dry_run(config, 8)  # TP 4 x PP 2; 32 layers in 4 virtual stages of 8
    expected = {
        0: [
            PipelineStage(0, tuple(range(0, 8)), True, False),
            PipelineStage(2, tuple(range(16, 24)), False, False),
        ],
        1: [
            PipelineStage(1, tuple(range(8, 16)), False, False),
            PipelineStage(3, tuple(range(24, 32)), False, True),
        ],
    }
    for rank in report.ranks:
        stages = expected[rank.stage]
        assert rank.chunks == tuple(s.layers for s in stages)
        specs = [report.layout.model_spec(s, rank.tp_rank) for s in stages]
        chunks = [count_shard(build_rank_shard(spec)) for spec in specs]
        assert rank.params.dense == sum(c.dense for c in chunks)
        assert rank.params.tables == sum(c.tables for c in chunks)
        assert rank.stem_layers == tuple(
            i for s in stages for i in s.layers if i in config.stem_layers()
        )
    dense, tables = report.replica_sums()
    assert dense + tables == report.counts.total_params
    # Interleaved 1F1B: rank 0 holds 2(pp-1) + (vp-1)pp + 1 = 5 chunk passes of 8 layers,
    # L (1 + (pp-1)/(pp vp)) = 40 layers' worth; the last rank 3 passes plus its head once.
    chunk = chunk_activations(
        config.model,
        8,
        ActivationSetup(
            tp_size=4,
            sequence_parallel=config.parallel.sequence_parallel,
            micro_batch_size=1,
            bf16=True,
        ),
    ).stored
    first, last = report.ranks[0].memory, report.ranks[-1].memory
    assert (first.passes_in_flight, last.passes_in_flight) == (5, 3)
    assert first.activations == 5 * chunk + first.activations_once
    assert last.activations > 3 * chunk


def _real_chunks(overrides: list[str]) -> dict:
    """On one process of a run: the parameters of the chunks training builds for this rank."""
    from stem_megatron.parallel.dims import ParallelDims
    from stem_megatron.parallel.state import ParallelState
    from stem_megatron.training.model_chunks import build_model_chunks

    config = load_config(STEM_1B, overrides)
    parallel = ParallelState.initialize(pp_size=2, vp_size=2)
    try:
        chunks = build_model_chunks(ParallelDims(config, parallel.world_size, 1001), parallel)
        counts = [count_shard(c) for c in chunks]
        return {
            "pp": parallel.pp_rank,
            "dp": parallel.dp_rank,
            "chunks": [
                sorted(
                    {
                        int(n.split(".")[2])
                        for n, _ in c.named_parameters()
                        if n.startswith("decoder.layers.")
                    }
                )
                for c in chunks
            ],
            "dense": sum(c.dense for c in counts),
            "tables": sum(c.tables for c in counts),
            "table_shapes": [list(s) for c in counts for s in c.table_shapes],
        }
    finally:
        parallel.destroy()


def _check_against_training(world: int, rank_types: int) -> None:
    report = dry_run(load_config(STEM_1B, TINY), world)
    real = run_local_workers(world, _real_chunks, TINY, timeout=240)
    assert len(report.ranks) == rank_types
    for got in real:
        (shard,) = [r for r in report.ranks if r.stage == got["pp"] and got["dp"] in r.dp_ranks]
        assert [list(c) for c in shard.chunks] == got["chunks"]
        assert (shard.params.dense, shard.params.tables) == (got["dense"], got["tables"])
        assert [list(s) for s in shard.params.table_shapes] == got["table_shapes"]


def test_interleaved_dry_run_matches_what_training_builds():
    """PP 2, two chunks per pipeline rank: each real rank's chunks (training/model_chunks.py,
    on CPU) have the dry run's layers and parameters."""
    _check_against_training(2, rank_types=2)


@pytest.mark.slow
def test_interleaved_vocab_sharded_dry_run_matches_what_training_builds():
    """The same on PP 2 x DP 2 with vocab-sharded tables (blocks of 501 and 500 rows)."""
    _check_against_training(4, rank_types=4)
