"""Every parallel layout trains like the single process: per-step losses and every parameter
(tables included) after several steps agree within 1e-5 relative (fp32; per tensor,
||parallel - single|| / ||single||). Real processes, joined by gloo as torchrun would start them.
Each run also reports the layout it really built (ranks, group sizes, model chunks, table
layout), checked against the case, so an override the trainer ignored cannot pass as DP.

Adam's eps is 1e-5 here, not 1e-8: a layout changes the order of fp32 sums (TP all-reduces
partial products), and Adam's g / (sqrt(v) + eps) turns that rounding noise in gradient
elements near 1e-8 into O(1) relative noise in their updates. Measured with eps 1e-8 after
5 steps: every untied layout stays within 6e-7, but tied TP=2 (and TP2 x PP2) reach 1.04e-5
in decoder.layers.0.self_attention.linear_proj.weight; with 1e-5 the worst is 6.3e-7. The
test is of the parallel math, so it uses the eps that lets rounding noise stay rounding noise.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.training.short_run import train_steps

STEPS = 5
RTOL = 1e-5
NUM_LAYERS = 4
TP2 = ["parallel.tensor_model_parallel_size=2"]
PP2 = ["parallel.pipeline_model_parallel_size=2"]
VP2 = ["parallel.virtual_pipeline_model_parallel_size=2"]
VOCAB_SHARDED = ["stem.dp_layout=vocab_sharded"]
TIED = ["model.untie_embeddings_and_output_weights=false"]


@dataclass(frozen=True)
class Grid:
    """The layout a case must really run: sizes, and per pipeline rank the global layers of
    each of its model chunks (None: split evenly over pp stages, one chunk each)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    dp_layout: str = "replicated"
    stages: tuple[tuple[tuple[int, ...], ...], ...] | None = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def chunk_layers(self, pp_rank: int) -> list[list[int]]:
        if self.stages is not None:
            return [list(layers) for layers in self.stages[pp_rank]]
        per_stage = NUM_LAYERS // self.pp
        return [list(range(pp_rank * per_stage, (pp_rank + 1) * per_stage))]


def assert_layout(results, grid: Grid) -> None:
    """The ranks cover exactly the expected (tp, pp, dp) grid, each with the expected sizes,
    model chunks and table layout: an override silently ignored fails here."""
    layouts = [r["layout"] for r in results]
    ranks = sorted((x["tp_rank"], x["pp_rank"], x["dp_rank"]) for x in layouts)
    expected = list(itertools.product(range(grid.tp), range(grid.pp), range(grid.dp)))
    assert ranks == expected, f"(tp, pp, dp) ranks {ranks}, expected {expected}"
    for x in layouts:
        assert (x["tp_size"], x["pp_size"], x["dp_size"]) == (grid.tp, grid.pp, grid.dp), x
        assert x["chunk_layers"] == grid.chunk_layers(x["pp_rank"]), x
        assert x["vp_size"] == len(x["chunk_layers"]), x
        assert x["dp_layout"] == grid.dp_layout, x


@pytest.fixture(scope="module")
def base_overrides(small_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs")
    return [
        f"model.num_layers={NUM_LAYERS}",
        "model.hidden_size=32",
        "model.ffn_hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.seq_length=32",
        "model.make_vocab_size_divisible_by=64",
        "stem.layers=[1,2]",
        "model.untie_embeddings_and_output_weights=true",
        "stem.optimizer.lr=0.01",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.train_iters=20",
        "optim.lr_warmup_iters=2",
        "optim.lr=0.003",
        "optim.min_lr=0.0003",
        "optim.clip_grad=0.5",
        "optim.adam_eps=1e-5",
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
        f"logging.run_dir={run}",
    ]


@pytest.fixture(scope="module")
def single_process(base_overrides):
    """`single_process(model_overrides)`: the single-process run of the base config with
    those overrides (each computed once per module)."""
    runs: dict[tuple[str, ...], dict] = {}

    def get(model_overrides: list[str]) -> dict:
        key = tuple(model_overrides)
        if key not in runs:
            (runs[key],) = run_local_workers(
                1, train_steps, base_overrides + model_overrides, STEPS
            )
            assert_layout([runs[key]], Grid())
        return runs[key]

    return get


def merged_params(results) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        for name, value in result["params"].items():
            if name in merged:  # replicas must agree exactly with each other
                torch.testing.assert_close(value, merged[name], rtol=0, atol=0)
            merged[name] = value
    return merged


def assert_equivalent(results, reference) -> float:
    worst = 0.0
    for result in results:
        losses = torch.tensor(result["losses"])
        ref = torch.tensor(reference["losses"])
        assert losses.shape == ref.shape
        worst = max(worst, ((losses - ref).abs() / ref.abs()).max().item())
    params = merged_params(results)
    assert sorted(params) == sorted(reference["params"])
    for name, value in params.items():
        ref = reference["params"][name]
        rel = ((value - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        worst = max(worst, rel)
        assert rel <= RTOL, f"{name}: max relative difference {rel:.2e}"
    assert worst <= RTOL, f"losses differ by {worst:.2e}"
    return worst


# (overrides of the parallel run, overrides of both runs, the layout the ranks must run)
LAYOUTS = {
    "tp2": (TP2, [], Grid(tp=2)),
    "dp2-replicated": ([], [], Grid(dp=2)),
    "dp2-vocab-sharded": (VOCAB_SHARDED, [], Grid(dp=2, dp_layout="vocab_sharded")),
    "pp2": (PP2, [], Grid(pp=2)),
    "pp2-uneven": (
        PP2 + ["parallel.pipeline_layers=[1,3]"],
        [],
        Grid(pp=2, stages=(((0,),), ((1, 2, 3),))),
    ),
    # Virtual stage v of pipeline rank r holds layer v * pp + r.
    "pp2-interleaved": (PP2 + VP2, [], Grid(pp=2, stages=(((0,), (2,)), ((1,), (3,))))),
    "tp2xpp2": (TP2 + PP2, [], Grid(tp=2, pp=2)),
    # PP x DP: the schedules run every micro-batch but the last without grad sync, so the
    # dense grads must still be averaged over DP when the last backward (not forward) ends.
    "pp2xdp2": (PP2, [], Grid(pp=2, dp=2)),
    "pp2xdp2-interleaved-vocab-sharded": (
        PP2 + VP2 + VOCAB_SHARDED,
        [],
        Grid(pp=2, dp=2, dp_layout="vocab_sharded", stages=(((0,), (2,)), ((1,), (3,)))),
    ),
    # Recomputed layers (full, one per region) whose host tables read prefetched rows: each
    # region takes one staged slot per table and micro-batch, with interleaved 1F1B running
    # several micro-batches' forwards before their (recomputing) backwards.
    "pp2-interleaved-recompute-host": (
        PP2
        + VP2
        + [
            "model.recompute_granularity=full",
            "model.recompute_method=uniform",
            "model.recompute_num_layers=1",
        ],
        ["stem.storage=host"],
        Grid(pp=2, stages=(((0,), (2,)), ((1,), (3,)))),
    ),
    "tp2-tied": (TP2, TIED, Grid(tp=2)),
    # Tied across stages: the last stage's copy of the embedding must equal the first's
    # bitwise (merged_params) and both the single process's.
    "pp2-interleaved-tied": (PP2 + VP2, TIED, Grid(pp=2, stages=(((0,), (2,)), ((1,), (3,))))),
    "tp2xpp2-tied": (TP2 + PP2, TIED, Grid(tp=2, pp=2)),
}


@pytest.mark.parametrize("case", LAYOUTS)
def test_layout_matches_single_process(base_overrides, single_process, case):
    extra, model, grid = LAYOUTS[case]
    results = run_local_workers(grid.world, train_steps, base_overrides + model + extra, STEPS)
    assert_layout(results, grid)
    worst = assert_equivalent(results, single_process(model))
    print(f"{case}: max relative difference {worst:.2e}")


# Save under one layout (overrides, layout), resume under another (, overrides of both).
RESHARDS = {
    "tp2-to-single": ((TP2, Grid(tp=2)), ([], Grid())),
    "single-to-tp2": (([], Grid()), (TP2, Grid(tp=2))),
    "dp2-to-tp2": (([], Grid(dp=2)), (TP2, Grid(tp=2))),
    "vocab-sharded-to-single": (
        (VOCAB_SHARDED, Grid(dp=2, dp_layout="vocab_sharded")),
        ([], Grid()),
    ),
    "single-to-vocab-sharded": (
        ([], Grid()),
        (VOCAB_SHARDED, Grid(dp=2, dp_layout="vocab_sharded")),
    ),
    "pp2-to-single": ((PP2, Grid(pp=2)), ([], Grid())),
    "single-to-pp2-interleaved": (([], Grid()), (PP2 + VP2, LAYOUTS["pp2-interleaved"][2])),
    "pp2-tied-to-single": ((PP2, Grid(pp=2)), ([], Grid()), TIED),
}


@pytest.mark.parametrize("case", RESHARDS)
def test_checkpoint_loads_under_another_layout(base_overrides, single_process, tmp_path, case):
    """Save after step 3 under one layout, resume under another: steps 4-5 and the final
    parameters equal the uninterrupted single-process run (DCP reshards on load)."""
    (save_extra, save_grid), (load_extra, load_grid), *model = RESHARDS[case]
    model = model[0] if model else []
    saved = tmp_path / "saved"
    saving = run_local_workers(
        save_grid.world,
        train_steps,
        base_overrides + model + save_extra + [f"logging.run_dir={saved}"],
        3,
        3,
    )
    assert_layout(saving, save_grid)
    resumed = run_local_workers(
        load_grid.world,
        train_steps,
        base_overrides
        + model
        + load_extra
        + [f"logging.run_dir={tmp_path / 'resumed'}", f"checkpoint.load={saved}"],
        STEPS - 3,
    )
    assert_layout(resumed, load_grid)
    assert all(r["start"] == 3 for r in resumed)
    reference = single_process(model)
    tail = {"losses": reference["losses"][3:], "params": reference["params"]}
    worst = assert_equivalent(resumed, tail)
    print(f"{case}: max relative difference {worst:.2e}")
