"""Checkpoints stay layout-independent with megatron-core's optimizers.

A run saves after step 3 of 5 and goes on; the checkpoint is resumed under another layout and
optimizer for steps 4-5, whose losses and final parameters must equal the uninterrupted run's
(fp32: 1e-5 relative, the layout tolerance of tests/parallel/test_equivalence.py; bf16 under
the same layout: bitwise). The distributed optimizer saves each DP rank's flat range of the
main values and moments (checkpoint/flat_shard.py); the plain ones save whole tensors; either
loads the other. Real gloo processes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stem_megatron.checkpoint.flat_shard import flat_range_boxes
from stem_megatron.checkpoint.offline import OfflineCheckpoint
from stem_megatron.cli import convert_checkpoint, edit_knowledge
from stem_megatron.editing.tables import OPTIM_PREFIX, table_key
from stem_megatron.hf.exporter import export_checkpoint
from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.sharding import TPShard, set_tp_shard
from stem_megatron.training.short_run import train_steps

STEPS, SAVE_AT, RTOL = 5, 3, 1e-5
DIST_OPT = ["optim.use_distributed_optimizer=true"]
TP2 = ["parallel.tensor_model_parallel_size=2"]
PP2 = ["parallel.pipeline_model_parallel_size=2"]
BF16 = ["train.bf16=true"]
FC2 = "model.decoder.layers.0.mlp.linear_fc2.weight"
FC2_ADAM = "optim.decoder.layers.0.mlp.linear_fc2.weight.exp_avg_sq"


@pytest.fixture(scope="module")
def base(small_corpus):
    return [
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.ffn_hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.seq_length=32",
        "model.make_vocab_size_divisible_by=64",
        "stem.layers=[1]",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.train_iters=20",
        "optim.lr_warmup_iters=2",
        "optim.lr=0.003",
        "optim.min_lr=0.0003",
        "optim.clip_grad=0.5",
        "optim.adam_eps=1e-5",  # eps: see test_equivalence.py
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
    ]


def _run(world: int, overrides: list[str], steps: int, save_at: int | None = None) -> dict:
    """Losses of every rank's steps (they agree) and the parameters merged over ranks."""
    if world == 1:  # in this process: a spawned one costs seconds of imports
        results = [train_steps(overrides, steps, save_at)]
    else:
        results = run_local_workers(world, train_steps, overrides, steps, save_at, timeout=600)
    params: dict[str, torch.Tensor] = {}
    for result in results:
        for name, value in result["params"].items():
            params.setdefault(name, value)
    return {"losses": results[0]["losses"], "params": params, "start": results[0]["start"]}


def _worst_difference(run: dict, reference: dict) -> float:
    """Largest relative difference of losses and parameters (norm per tensor)."""
    losses, ref = torch.tensor(run["losses"]), torch.tensor(reference["losses"])
    worst = ((losses - ref).abs() / ref.abs()).max().item()
    assert sorted(run["params"]) == sorted(reference["params"])
    for name, value in run["params"].items():
        expected = reference["params"][name]
        worst = max(worst, ((value - expected).norm() / expected.norm()).item())
    return worst


def _save_and_go_on(tmp_path, base, world: int, extra: list[str]) -> tuple[dict, dict]:
    """The run that saves after SAVE_AT and trains on to STEPS, and its steps after the save
    as the reference a resume must reproduce."""
    saved = _run(world, base + extra + [f"logging.run_dir={tmp_path / 'saved'}"], STEPS, SAVE_AT)
    return saved, {"losses": saved["losses"][SAVE_AT:], "params": saved["params"]}


def _resume(tmp_path, base, name: str, world: int, extra: list[str]) -> dict:
    resumed = _run(
        world,
        base
        + extra
        + [f"logging.run_dir={tmp_path / name}", f"checkpoint.load={tmp_path / 'saved'}"],
        STEPS - SAVE_AT,
    )
    assert resumed["start"] == SAVE_AT
    return resumed


@pytest.mark.parametrize(
    "shape, start, end",
    [
        ((5, 7), 0, 35),
        ((5, 7), 3, 4),
        ((5, 7), 3, 30),
        ((5, 7), 7, 14),
        ((5, 7), 9, 13),
        ((2, 3, 4), 5, 23),
        ((2, 3, 4), 0, 12),
        ((2, 3, 4), 13, 24),
        ((6,), 2, 5),
        ((4, 4), 5, 5),
    ],
)
def test_flat_range_boxes_are_the_range_in_order(shape, start, end):
    """Each box is a contiguous run of the range's elements, in order, covering it exactly."""
    index = torch.arange(math.prod(shape)).view(shape)
    runs = []
    for offsets, sizes in flat_range_boxes(shape, start, end):
        box = index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].reshape(-1)
        runs.append(box)
        assert torch.equal(box, torch.arange(box[0], box[0] + box.numel())), (offsets, sizes)
    flat = torch.cat(runs) if runs else torch.empty(0, dtype=torch.long)
    assert torch.equal(flat, torch.arange(start, end))


def _flat_ranges_worker(root: str, ranges: dict[str, list[tuple[int, int]]]) -> dict:
    """Rank r saves elements ranges[key][r] of each tensor in FULL as flat shards, then loads
    elements ranges[key][1 - r] back: what each rank read."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from stem_megatron.checkpoint.dcp import Checkpointer
    from stem_megatron.checkpoint.flat_shard import flat_shard_view
    from stem_megatron.checkpoint.model_state import CheckpointMeshes

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    solo = [dist.new_group([r]) for r in range(2)]  # TP=1: each rank its own TP group
    meshes = CheckpointMeshes(DeviceMesh.from_group(solo[rank], "cpu"))

    def flats(pick: int, fill: bool) -> dict[str, torch.Tensor]:
        return {
            key: full.reshape(-1)[slice(*ranges[key][pick])].clone()
            if fill
            else torch.zeros(ranges[key][pick][1] - ranges[key][pick][0])
            for key, (_, full) in FULL.items()
        }

    def views(flat: dict[str, torch.Tensor], pick: int) -> dict:
        return {
            key: flat_shard_view(flat[key], FULL[key][0], ranges[key][pick][0], meshes)
            for key in FULL
        }

    Checkpointer(root).save(1, views(flats(rank, fill=True), rank), {"step": 1})
    loaded = flats(1 - rank, fill=False)
    Checkpointer(root).load(root, views(loaded, 1 - rank))  # in place
    dist.destroy_process_group()
    return loaded


def _fc1_like() -> torch.Tensor:
    like = torch.empty(4, 6)
    set_tp_shard(like, TPShard(dim=0, chunks=2))  # megatron's fused [gate; up]
    return like


FULL = {
    "matrix": (torch.empty(5, 7), torch.arange(35.0).reshape(5, 7)),
    "fc1": (_fc1_like(), torch.arange(24.0).reshape(4, 6)),
    "norm": (torch.empty(9), torch.arange(9.0)),
}


def test_flat_ranges_save_and_load_as_the_full_tensor(tmp_path):
    """Two ranks save complementary flat ranges; one process reads the full tensors, and each
    rank loads the other's range back."""
    ranges = {"matrix": [(0, 17), (17, 35)], "fc1": [(0, 5), (5, 24)], "norm": [(0, 4), (4, 9)]}
    loaded = run_local_workers(2, _flat_ranges_worker, str(tmp_path), ranges)
    ckpt = OfflineCheckpoint(tmp_path)
    for key, (_, full) in FULL.items():
        stored = ckpt.read(key)
        expected = full.view(2, 2, 6) if key == "fc1" else full  # fc1's checkpoint shape
        assert torch.equal(stored, expected), key
        for rank in range(2):
            start, end = ranges[key][1 - rank]
            assert torch.equal(loaded[rank][key], full.reshape(-1)[start:end]), (key, rank)


def test_distributed_optimizer_checkpoint_resumes_without_it_in_one_process(tmp_path, base):
    """Saved under DP=2 with the distributed optimizer (each rank saves its range of every
    bucket), resumed by one process without it: the uninterrupted run's steps 4-5."""
    saved, reference = _save_and_go_on(tmp_path, base, 2, DIST_OPT)
    worst = _worst_difference(_resume(tmp_path, base, "single", 1, []), reference)
    assert worst <= RTOL, f"resumed run differs by {worst:.2e}"
    print(f"dp2 distributed -> single: max relative difference {worst:.2e}")


# Saved under DP=4 with the distributed optimizer, resumed as (world, overrides).
FROM_DP4 = {
    "dp2": (2, []),
    "tp2": (2, TP2),
    "pp2xdp2-distributed": (4, PP2 + DIST_OPT),
    "tp2xdp2-distributed": (4, TP2 + DIST_OPT),
}


@pytest.fixture(scope="module")
def dp4_distributed(base, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dp4_distributed")
    return root, _save_and_go_on(root, base, 4, DIST_OPT)[1]


@pytest.mark.slow
@pytest.mark.parametrize("case", FROM_DP4)
def test_dp4_distributed_optimizer_checkpoint_resumes_under_another_layout(
    dp4_distributed, base, case
):
    root, reference = dp4_distributed
    world, extra = FROM_DP4[case]
    worst = _worst_difference(_resume(root, base, case, world, extra), reference)
    assert worst <= RTOL, f"{case}: resumed run differs by {worst:.2e}"
    print(f"dp4 distributed -> {case}: max relative difference {worst:.2e}")


# Saved under TP or PP with the distributed optimizer: TP blocks of ranges, and the tied
# embedding's last-stage copy (a range of another stage's buffer), resumed in one process.
SAVED_UNDER = {"pp2xdp2-distributed": PP2 + DIST_OPT, "tp2xdp2-distributed": TP2 + DIST_OPT}


@pytest.mark.slow
@pytest.mark.parametrize("case", SAVED_UNDER)
def test_distributed_optimizer_checkpoint_saved_under_tp_or_pp_resumes(tmp_path, base, case):
    saved, reference = _save_and_go_on(tmp_path, base, 4, SAVED_UNDER[case])
    worst = _worst_difference(_resume(tmp_path, base, "single", 1, []), reference)
    assert worst <= RTOL, f"{case}: resumed run differs by {worst:.2e}"
    print(f"{case} -> single: max relative difference {worst:.2e}")


@pytest.mark.slow
def test_plain_checkpoint_resumes_with_the_distributed_optimizer(tmp_path, base):
    saved, reference = _save_and_go_on(tmp_path, base, 2, TP2)
    worst = _worst_difference(_resume(tmp_path, base, "dp4", 4, DIST_OPT), reference)
    assert worst <= RTOL, f"resumed run differs by {worst:.2e}"
    print(f"tp2 -> dp4 distributed: max relative difference {worst:.2e}")


@pytest.fixture(scope="module")
def bf16_distributed(base, tmp_path_factory) -> tuple[Path, dict]:
    """A bf16 DP=2 run with the distributed optimizer that saved after SAVE_AT (its dir), and
    its steps after the save."""
    root = tmp_path_factory.mktemp("bf16_distributed")
    return root, _save_and_go_on(root, base, 2, BF16 + DIST_OPT)[1]


def test_bf16_distributed_checkpoint_resumes_exactly_with_fp32_main_weights(bf16_distributed, base):
    """bf16 with the distributed optimizer: the resume is bitwise the uninterrupted run, and
    the checkpoint's weights are the fp32 main values (not bf16-rounded)."""
    root, reference = bf16_distributed
    resumed = _resume(root, base, "resumed", 2, BF16 + DIST_OPT)
    assert resumed["losses"] == reference["losses"]
    for name, value in resumed["params"].items():
        assert torch.equal(value, reference["params"][name]), name
    weight = OfflineCheckpoint(root / "saved").read(FC2)
    assert weight.dtype == torch.float32
    assert not torch.equal(weight, weight.bfloat16().float())  # main values, not the bf16 copy


def test_tools_read_a_distributed_optimizer_checkpoint(
    bf16_distributed, parallel, tmp_path, capsys
):
    """convert_checkpoint (reshard to one process without the distributed optimizer, and
    to-safetensors), the HF export and edit_knowledge on a checkpoint whose main values and
    moments each DP rank saved as its range."""
    source = bf16_distributed[0] / "saved" / "checkpoints" / f"step_{SAVE_AT}"
    src = OfflineCheckpoint(source)
    assert (
        convert_checkpoint.main(
            [
                "reshard",
                str(source),
                str(tmp_path / "one"),
                "optim.use_distributed_optimizer=false",
                "--quiet",
            ]
        )
        == 0
    )
    one = OfflineCheckpoint(tmp_path / "one")
    assert one.config_dict["optim"]["use_distributed_optimizer"] is False
    for key in src.keys():  # loaded whole from the ranges and saved again: bitwise
        assert torch.equal(one.read(key), src.read(key)), key

    assert (
        convert_checkpoint.main(["to-safetensors", str(source), str(tmp_path / "st"), "--quiet"])
        == 0
    )
    with safe_open(tmp_path / "st" / "checkpoint.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(src.keys())
        assert torch.equal(f.get_tensor(FC2_ADAM), src.read(FC2_ADAM))

    hf = export_checkpoint(str(source), tmp_path / "hf", log=lambda _: None)
    exported = load_file(hf / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(exported, src.read(FC2))  # the fp32 main values

    word = "the"  # one token of the small corpus's BPE, as " the"
    assert (
        edit_knowledge.main(
            [
                "--checkpoint",
                str(source),
                "--output",
                str(tmp_path / "edit"),
                "--swap",
                f"{word}=and",
                "--layers",
                "1",
            ]
        )
        == 0
    ), capsys.readouterr().err
    edited = OfflineCheckpoint(tmp_path / "edit")
    for key in src.keys():
        if not key.startswith((table_key(1), OPTIM_PREFIX.format(layer=1))):
            assert torch.equal(edited.read(key), src.read(key)), key


@pytest.mark.slow
def test_offloaded_optimizer_checkpoint_resumes_exactly(tmp_path, base):
    """optim.optimizer_cpu_offload: the state lives in the host sub-optimizers (in place,
    loaded into theirs), and the resume is bitwise the uninterrupted run."""
    offload = BF16 + DIST_OPT + ["optim.optimizer_cpu_offload=true"]
    saved, reference = _save_and_go_on(tmp_path, base, 2, offload)
    resumed = _resume(tmp_path, base, "resumed", 2, offload)
    assert resumed["losses"] == reference["losses"]
    for name, value in resumed["params"].items():
        assert torch.equal(value, reference["params"][name]), name
