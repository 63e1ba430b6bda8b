"""The layout matrix (issue 10 item 7) through the CLI as users launch it: `torchrun
--standalone --nproc_per_node=N -m stem_megatron.train --config configs/tiny.yaml ...` on a
4-layer model for 6 steps. Every case exits 0 with one `done:` line, and its per-step
loss/train (metrics.jsonl) and final parameters (its last checkpoint) equal one plain process's
within 1e-5 relative in fp32 (per tensor, ||run - single|| / ||single||; Adam eps 1e-5, as
tests/parallel/test_equivalence.py explains). bf16 runs follow the fp32 curve within measured
tolerances and keep fp32 master weights. The shipped 7B and 30B configs' layouts run at the
smallest world that keeps their shape. The cases: layout_matrix_cases.py."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

from stem_megatron.checkpoint.offline import OfflineCheckpoint
from tests.launch.conftest import CONFIG, ROOT, train_command, train_losses
from tests.launch.layout_matrix_cases import (
    DEFAULT,
    EIGHT_PROCESSES,
    FLAGS,
    FULL,
    LAYOUTS,
    NUM_LAYERS,
    SLOW,
    Layout,
    shape_of,
)
from tests.launch.processes import ProcessScope
from tests.launch.test_train_cli_layouts import only_line, train

STEPS = 6
RTOL = 1e-5
# bf16 against the fp32 single process. Measured over 6 steps on PP2 x DP2: per-step loss
# 4.4e-5, parameters 1.34e-2 (one process in bf16: 1.2e-5 and 1.41e-2, in the same tensor);
# an unaveraged DP grad (issue 10 item 1) moved them by 7.2e-3 and 0.55 in fp32.
BF16_LOSS_RTOL = 5e-4
BF16_PARAM_RTOL = 3e-2


@pytest.fixture(scope="module")
def base(small_corpus) -> list[str]:
    """4 layers (tables in layers 1 and 2), 2 micro-batches per DP rank, one save at the end."""
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
        f"train.train_iters={STEPS}",
        "train.eval_interval=0",
        "train.eval_iters=1",
        "optim.lr_warmup_iters=2",
        "optim.lr=0.003",
        "optim.min_lr=0.0003",
        "optim.clip_grad=0.5",
        "optim.adam_eps=1e-5",
        "logging.log_interval=1",
        "checkpoint.save_interval=0",
        "train.seed=7",
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
    ]


def launch(scope, run_dir: Path, nproc: int, overrides: list[str]) -> Path:
    """The CLI under torchrun (or as one plain process): every rank exits 0, one `done:`."""
    out = (
        train(scope, run_dir, nproc, overrides + ["--sample-prompt", ""])
        if nproc > 1
        else single(scope, run_dir, overrides)
    )
    only_line(out, f"done: step {STEPS} |")
    return run_dir


def single(scope, run_dir: Path, overrides: list[str]) -> str:
    code, out = scope.run(
        [
            sys.executable,
            "-m",
            "stem_megatron.train",
            "--config",
            CONFIG,
            *train_command(run_dir, overrides),
        ],
        "single",
        timeout=300,
        cwd=ROOT,
    )
    assert code == 0 and "Traceback" not in out, out[-4000:]
    return out


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """`reference(model)`: the run dir of one plain process training the base config with
    `model` overrides in fp32 (each trained once per module)."""
    runs: dict[tuple[str, ...], Path] = {}

    def get(model: list[str]) -> Path:
        if tuple(model) not in runs:
            tmp = tmp_path_factory.mktemp("reference")
            scope = ProcessScope(tmp)
            try:
                runs[tuple(model)] = launch(scope, tmp / "run", 1, base + model)
            finally:
                scope.close()
        return runs[tuple(model)]

    return get


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of the run's last checkpoint, as the full logical tensor."""
    ckpt = OfflineCheckpoint(run_dir)
    assert ckpt.step == STEPS
    return dict(ckpt.tensors(k for k in ckpt.keys() if k.startswith("model.")))


def differences(run_dir: Path, reference_dir: Path) -> tuple[float, dict[str, float]]:
    """The worst per-step relative loss difference, and each parameter's relative norm
    difference, of a run against the reference."""
    losses, ref = train_losses(run_dir), train_losses(reference_dir)
    assert sorted(losses) == sorted(ref) == list(range(1, STEPS + 1))
    loss_diff = max(abs(losses[s] - ref[s]) / abs(ref[s]) for s in ref)
    params, ref_params = final_parameters(run_dir), final_parameters(reference_dir)
    assert sorted(params) == sorted(ref_params)
    param_diff = {
        k: (
            (v.double() - ref_params[k].double()).norm()
            / ref_params[k].double().norm().clamp_min(1e-12)
        ).item()
        for k, v in params.items()
    }
    return loss_diff, param_diff


def assert_close_to(
    run_dir: Path, reference_dir: Path, loss_rtol: float, param_rtol: float, name: str
) -> None:
    loss_diff, param_diff = differences(run_dir, reference_dir)
    worst = max(param_diff, key=param_diff.get)
    print(f"{name}: loss {loss_diff:.2e}, parameters {param_diff[worst]:.2e} ({worst})")
    assert loss_diff <= loss_rtol, f"{name}: per-step loss differs by {loss_diff:.2e}"
    assert param_diff[worst] <= param_rtol, f"{name}: {worst} differs by {param_diff[worst]:.2e}"


def first_step_comm(run_dir: Path) -> dict[str, float]:
    """Rank 0's bytes moved in step 1, by purpose and kind (comm/*_bytes in metrics.jsonl)."""
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return {
        k.removeprefix("comm/").removesuffix("_bytes"): v
        for k, v in first.items()
        if k.startswith("comm/")
    }


def assert_ran_as(run_dir: Path, layout: Layout, on: frozenset[str] = frozenset()) -> None:
    """The run really split the model as asked: rank 0 moved bytes over TP, PP (point-to-
    point) and DP (dense grads) exactly where those sizes exceed 1, and reduce-scattered only
    where SP (over TP), the distributed optimizer or vocab-sharded tables (over DP) do: an
    ignored override cannot pass as the layout (recomputation moves no bytes of its own)."""
    comm = first_step_comm(run_dir)
    print(f"  comm in step 1 (rank 0): {comm}")
    moved = {k: comm[k] > 0 for k in ("tp", "pp", "dp_dense", "reduce_scatter")}
    scatters = "sp" in on or (layout.dp > 1 and bool({"distopt", "vocab_sharded"} & on))
    assert moved == {
        "tp": layout.tp > 1,
        "pp": layout.pp > 1,
        "dp_dense": layout.dp > 1,
        "reduce_scatter": scatters,
    }, comm


def test_default_subset_covers_the_matrix():
    """Every layout runs in the default suite (the 8-process one only under slow), each flag
    that applies to it both off and on, and every pair of flags in all four combinations;
    default and slow together are the full cross product, each case once."""
    assert sorted(c.id for c in DEFAULT + SLOW) == sorted(c.id for c in FULL)
    assert len({c.id for c in FULL}) == len(FULL)
    assert {c.layout for c in DEFAULT} == set(LAYOUTS) - EIGHT_PROCESSES
    for name in {c.layout for c in DEFAULT}:
        rows = [c.on for c in DEFAULT if c.layout == name]
        for flag in LAYOUTS[name].flags:
            assert {flag in on for on in rows} == {False, True}, (name, flag)
    for a, b in itertools.combinations(FLAGS, 2):
        seen = {(a in c.on, b in c.on) for c in DEFAULT if {a, b} <= set(LAYOUTS[c.layout].flags)}
        assert seen == set(itertools.product((False, True), repeat=2)), (a, b, seen)


def matrix_params():
    slow = pytest.mark.slow
    return [pytest.param(c, id=c.id) for c in DEFAULT] + [
        pytest.param(c, id=c.id, marks=slow) for c in SLOW
    ]


@pytest.mark.parametrize("case", matrix_params())
def test_layout_trains_like_one_process(scope, tmp_path, base, reference, case):
    layout = LAYOUTS[case.layout]
    run = launch(scope, tmp_path / "run", layout.world, base + case.overrides)
    assert_close_to(run, reference([]), RTOL, RTOL, case.id)
    assert_ran_as(run, layout, case.on)


def assert_master_weights_fp32(run_dir: Path) -> None:
    """The checkpoint holds the dense parameters as the optimizer steps them: fp32, and with
    more precision than bf16 carries (master weights kept in bf16 and widened on the way out
    would all be bf16 values), and fp32 Adam moments."""
    ckpt = OfflineCheckpoint(run_dir)
    dense = [k for k in ckpt.keys() if k.startswith("model.") and "stem" not in k]
    moments = [k for k in ckpt.keys() if k.startswith("optim.") and "exp_avg" in k]
    assert dense and moments
    assert {ckpt.info(k).dtype for k in dense + moments} == {torch.float32}
    values = torch.cat([t.flatten() for _, t in ckpt.tensors(dense)])
    beyond_bf16 = (values.bfloat16().float() != values).float().mean().item()
    assert beyond_bf16 > 0.5, f"only {beyond_bf16:.1%} of the fp32 weights are not bf16 values"


# name: (flags, overrides): megatron-core's two bf16 optimizers (fp32 main copies of the bf16
# params: Float16OptimizerWithFloat16Params; main shards: DistributedOptimizer), grads
# reduced in bf16 and, as the shipped configs do, in fp32.
BF16 = {
    "pp2xdp2-bf16": (frozenset(), []),
    "pp2xdp2-distopt-bf16-grad_reduce_in_fp32": (
        frozenset({"distopt"}),
        ["parallel.grad_reduce_in_fp32=true"],
    ),
}


@pytest.mark.parametrize("name", BF16)
def test_bf16_follows_fp32_with_fp32_master_weights(scope, tmp_path, base, reference, name):
    """train.bf16 (bf16 weights and activations, fp32 main weights) on PP2 x DP2: the fp32
    single process's curve within the bf16 tolerances."""
    on, extra = BF16[name]
    overrides = LAYOUTS["pp2xdp2"].overrides + [o for f in on for o in FLAGS[f]] + extra
    run = launch(scope, tmp_path / "run", 4, base + overrides + ["train.bf16=true"])
    assert_close_to(run, reference([]), BF16_LOSS_RTOL, BF16_PARAM_RTOL, name)
    assert_ran_as(run, LAYOUTS["pp2xdp2"], on)
    # Activations cross stages in bf16: the first stage sends each of its 2 micro-batches'
    # [seq 32, micro-batch 2, hidden 32] outputs at 2 bytes an element.
    assert first_step_comm(run)["p2p"] == 2 * 32 * 2 * 32 * 2
    assert_master_weights_fp32(run)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["stem_7b", "stem_30b"])
def test_shipped_config_shape_trains_like_one_process(scope, tmp_path, base, reference, config):
    """The config's layout (TP, PP and DP each 2, its interleaving, table layout, optimizer,
    recompute, SP and precision flags, and its attention shape) against the fp32 single
    process of the same model: 1e-5 in fp32, the bf16 tolerances in bf16."""
    layout, flags, model = shape_of(ROOT / "configs" / f"{config}.yaml")
    print(f"{config}: {layout} {flags} {model}")
    run = launch(scope, tmp_path / "run", layout.world, base + model + layout.overrides + flags)
    bf16 = "train.bf16=true" in flags
    assert_close_to(
        run,
        reference(model),
        BF16_LOSS_RTOL if bf16 else RTOL,
        BF16_PARAM_RTOL if bf16 else RTOL,
        config,
    )
    assert_ran_as(run, layout, frozenset(f for f, o in FLAGS.items() if set(o) <= set(flags)))
    if bf16:
        assert_master_weights_fp32(run)
