"""The layout object (parallel/dims.py): its checks (before anything is allocated), the rank
numbering it shares with megatron-core, what each rank holds, and pipeline stage assignment."""

from __future__ import annotations

import pytest
from megatron.core.parallel_state import RankGenerator

from stem_megatron.config import ConfigError
from stem_megatron.config_loader import load_config
from stem_megatron.parallel.dims import RANK_ORDER, ParallelDims, RankCoords, RankGrid
from stem_megatron.pipeline_split import even_layer_counts, pipeline_stages

SMALL = [
    "model.num_layers=4",
    "model.hidden_size=256",
    "model.ffn_hidden_size=512",
    "model.num_attention_heads=16",
    "model.num_query_groups=16",
    "model.make_vocab_size_divisible_by=500",
    "model.untie_embeddings_and_output_weights=true",
    "train.micro_batch_size=1",
    "train.global_batch_size=64",
]


def layout(world_size: int, *overrides: str, vocab_size: int = 1000):
    return ParallelDims(load_config(None, SMALL + list(overrides)), world_size, vocab_size)


def test_a_good_layout():
    lay = layout(
        32, "parallel.tensor_model_parallel_size=4", "parallel.pipeline_model_parallel_size=2"
    )
    assert (lay.tp_size, lay.pp_size, lay.dp_size) == (4, 2, 4)
    assert [s.layers for s in lay.stages] == [(0, 1), (2, 3)]


@pytest.mark.parametrize(
    "world_size,overrides,message",
    [
        (
            8,
            [
                "parallel.tensor_model_parallel_size=8",
                "model.num_attention_heads=12",
                "model.num_query_groups=4",
                "model.hidden_size=384",
            ],
            r"tensor_model_parallel_size \(8\) does not divide model.num_attention_heads \(12\)",
        ),
        (
            16,
            ["parallel.tensor_model_parallel_size=16", "model.num_query_groups=8"],
            r"tensor_model_parallel_size \(16\) does not divide model.num_query_groups \(8\)",
        ),
        (
            8,
            ["parallel.tensor_model_parallel_size=8", "model.ffn_hidden_size=500"],
            r"tensor_model_parallel_size \(8\) does not divide model.ffn_hidden_size \(500\)",
        ),
        (
            16,
            ["parallel.tensor_model_parallel_size=16"],
            r"tensor_model_parallel_size \(16\) does not divide the padded vocab size \(1000\) "
            r"\(vocab 1000 rounded up to a multiple of model.make_vocab_size_divisible_by=500\)",
        ),
        (
            8,
            ["parallel.pipeline_model_parallel_size=8"],
            r"pipeline_model_parallel_size \(8\) is larger than model.num_layers \(4\)",
        ),
        (
            12,
            ["parallel.tensor_model_parallel_size=4", "parallel.pipeline_model_parallel_size=2"],
            r"world size 12 is not divisible by tensor_model_parallel_size \(4\) x "
            r"pipeline_model_parallel_size \(2\) = 8",
        ),
        (
            2,
            ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layers=[1,2]"],
            r"pipeline_layers \[1, 2\] sums to 3; model.num_layers is 4",
        ),
        (
            2,
            ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layers=[4]"],
            r"pipeline_layers \[4\] has 1 entries; parallel.pipeline_model_parallel_size is 2",
        ),
        (
            2,
            ["parallel.pipeline_model_parallel_size=2", "parallel.pipeline_layers=[0,4]"],
            r"every stage needs at least one layer",
        ),
        (
            48,
            [],
            r"global_batch_size \(64\) must be a multiple of train.micro_batch_size \(1\) x "
            r"data-parallel size \(48\)",
        ),
        (
            2,
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
                "train.global_batch_size=3",
            ],
            r"interleaved schedule .* micro-batches per step \(3 = .*\) to be a multiple of "
            r"pipeline_model_parallel_size \(2\)",
        ),
    ],
)
def test_bad_layouts_name_the_numbers(world_size, overrides, message):
    with pytest.raises(ConfigError, match=message):
        layout(world_size, *overrides)


def test_even_split_gives_leftovers_to_middle_stages_then_the_first():
    assert even_layer_counts(32, 4) == [8, 8, 8, 8]
    assert even_layer_counts(30, 4) == [7, 8, 8, 7]
    assert even_layer_counts(31, 4) == [8, 8, 8, 7]
    assert even_layer_counts(5, 2) == [3, 2]
    assert even_layer_counts(3, 1) == [3]


def test_uneven_stages():
    stages = pipeline_stages(16, 4, [3, 5, 5, 3])
    assert [s.layers for s in stages] == [
        (0, 1, 2),
        (3, 4, 5, 6, 7),
        (8, 9, 10, 11, 12),
        (13, 14, 15),
    ]
    assert [(s.pre_process, s.post_process) for s in stages] == [
        (True, False),
        (False, False),
        (False, False),
        (False, True),
    ]
    (only,) = pipeline_stages(4, 1)
    assert only.pre_process and only.post_process and only.layers == (0, 1, 2, 3)


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 4), (2, 1, 3), (2, 2, 2), (4, 2, 1), (1, 4, 2)])
def test_coordinates_follow_megatrons_rank_order(tp, pp, dp):
    """Every group megatron-core builds (in the order parallel/state.py passes it) is the set
    of ranks that share all coordinates but one, ordered by that one."""
    grid = RankGrid(tp * pp * dp, tp, pp)
    megatron = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order=RANK_ORDER)
    for dim in ("tp", "dp", "pp"):
        for group in megatron.get_ranks(dim):
            coords = [grid.coords(r) for r in group]
            assert [getattr(c, dim) for c in coords] == list(range(len(group)))
            others = {tuple(v for k, v in vars(c).items() if k != dim) for c in coords}
            assert len(others) == 1
    for rank in range(grid.world_size):
        assert grid.rank(grid.coords(rank)) == rank


def test_a_stage_grid_names_the_dp_by_tp_ranks_of_one_pipeline_stage():
    grid = RankGrid(8, tp=2, pp=2)  # DP 2
    assert grid.stage_ranks(0) == [[0, 1], [2, 3]]
    assert grid.stage_ranks(1) == [[4, 5], [6, 7]]


def test_each_rank_builds_its_chunks_and_its_row_block():
    dims = layout(
        8,
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        "stem.dp_layout=vocab_sharded",
        "train.global_batch_size=8",
        vocab_size=1001,
    )
    assert dims.vocab_sharded and dims.dp_size == 2 and dims.num_microbatches == 4
    assert [(b.start, b.end) for b in map(dims.table_rows, range(2))] == [(0, 501), (501, 1001)]
    coords = dims.coords(7)
    assert coords == RankCoords(tp=1, pp=1, dp=1)
    (spec,) = dims.rank_specs(coords)
    assert (spec.tp_rank, spec.tp_size, spec.pp_size, spec.layers) == (1, 2, 2, (2, 3))
    assert spec.vocab_shard == (1, 2) and spec.table_rows == dims.table_rows(1)
    assert not spec.pre_process and spec.post_process
    replicated = layout(2, "stem.dp_layout=replicated", "train.global_batch_size=8")
    assert not replicated.vocab_sharded and replicated.table_rows(1) is None
    assert replicated.rank_specs(replicated.coords(1))[0].vocab_shard is None
