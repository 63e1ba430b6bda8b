"""tools/convert_checkpoint.py on real checkpoints: resharding through real target worlds
(gloo processes) and safetensors consolidation are bitwise, and training resumed from a
converted checkpoint continues exactly as the uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from stem_megatron.checkpoint.offline import OfflineCheckpoint
from stem_megatron.cli.convert_checkpoint import main
from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.training.short_run import train_steps
from stem_megatron.training.trainer import Trainer
from tests.config_overrides import as_overrides
from tests.tools.checkpoint_files import snapshot

TP2_PP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
TP1_PP1 = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]
RUN = [
    "checkpoint.save_interval=3",
    "model.untie_embeddings_and_output_weights=true",
]  # PP > 1 needs untied embeddings


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss/train"] for row in rows if "loss/train" in row}


def assert_same_tensors(a: OfflineCheckpoint, b: OfflineCheckpoint, keys=None) -> None:
    for key in keys if keys is not None else a.keys():
        assert torch.equal(a.read(key), b.read(key)), key


def resume_matches(tiny_config, parallel, full, checkpoint, run_dir) -> None:
    """Training resumed from `checkpoint` (step 3) repeats the uninterrupted run's losses."""
    resumed = tiny_config(
        *RUN,
        f"stem.optimizer.mode={full.stem.optimizer.mode}",
        f"checkpoint.load={checkpoint}",
        f"logging.run_dir={run_dir}",
    )
    trainer = Trainer(resumed, parallel)
    assert trainer.step == 3
    trainer.run()
    expected = losses(full.run_dir)
    assert losses(run_dir) == {step: expected[step] for step in (4, 5, 6)}


@pytest.fixture
def full_run(tiny_config, parallel, request):
    """Six steps in one process, checkpoints at steps 3 and 6. The table optimizer's mode is
    exact unless parametrised: its per-row settled steps must survive conversion."""
    full = tiny_config(*RUN, f"stem.optimizer.mode={getattr(request, 'param', 'exact')}")
    Trainer(full, parallel).run()
    return full


def test_reshard_round_trip_is_bitwise_and_resumes(full_run, tiny_config, parallel, tmp_path):
    source = full_run.run_dir / "checkpoints" / "step_3"
    before = snapshot(source)
    assert main(["reshard", str(source), str(tmp_path / "tp2pp2"), *TP2_PP2, "--quiet"]) == 0
    assert main(["reshard", str(tmp_path / "tp2pp2"), str(tmp_path / "tp1"), *TP1_PP1]) == 0
    assert snapshot(source) == before  # the input is only read

    src, tp2pp2, tp1 = (
        OfflineCheckpoint(p) for p in (source, tmp_path / "tp2pp2", tmp_path / "tp1")
    )
    # Every tensor is stored as its full logical tensor: a layout change moves no bit.
    assert set(tp2pp2.keys()) == set(src.keys()) | {f"rng.torch_rank{r}" for r in (1, 2, 3)}
    assert set(tp1.keys()) == set(tp2pp2.keys())  # ranks the TP1 world lacks are carried
    assert_same_tensors(src, tp2pp2, src.keys())
    assert_same_tensors(tp2pp2, tp1)
    for ckpt in (tp2pp2, tp1):
        assert ckpt.step == 3 and ckpt.scalars == src.scalars
        assert ckpt.metadata["data"] == src.metadata["data"]
    assert tp2pp2.config_dict["parallel"]["tensor_model_parallel_size"] == 2
    assert tp2pp2.config_dict["parallel"]["pipeline_model_parallel_size"] == 2
    assert tp1.config_dict["parallel"] == src.config_dict["parallel"]
    resume_matches(tiny_config, parallel, full_run, tmp_path / "tp1", tmp_path / "resumed")


@pytest.mark.slow
def test_reshard_back_to_tp2pp2_and_table_layouts(full_run, tmp_path):
    """TP2xPP2 -> TP1 -> TP2xPP2 reproduces the first TP2xPP2 checkpoint bit for bit, training
    resumed under TP2xPP2 continues the single-process run (within fp32 summation order), and
    vocab-sharded host-resident DP=2 and mmap-tier layouts round-trip too."""
    source = full_run.run_dir / "checkpoints" / "step_3"
    steps = [
        ("tp2pp2", TP2_PP2, 1),
        ("tp1", TP1_PP1, 1),
        ("again", TP2_PP2, 1),
        ("sharded", ["stem.dp_layout=vocab_sharded", "stem.storage=host"], 2),
        ("mapped", ["stem.dp_layout=replicated", "stem.storage=mmap"], 1),
        ("replicated", ["stem.storage=device"], 1),
    ]
    previous = source
    for name, overrides, dp in steps:
        assert (
            main(
                [
                    "reshard",
                    str(previous),
                    str(tmp_path / name),
                    *overrides,
                    f"--dp={dp}",
                    "--quiet",
                ]
            )
            == 0
        )
        previous = tmp_path / name
    first, again = OfflineCheckpoint(tmp_path / "tp2pp2"), OfflineCheckpoint(tmp_path / "again")
    assert set(first.keys()) == set(again.keys())
    assert_same_tensors(first, again)
    # The converted checkpoint trains in its own layout as the single process did.
    overrides = (
        as_overrides(full_run.to_dict())
        + TP2_PP2
        + [f"checkpoint.load={tmp_path / 'tp2pp2'}", f"logging.run_dir={tmp_path / 'resumed'}"]
    )
    result = run_local_workers(4, train_steps, overrides, 3)[0]
    expected = losses(full_run.run_dir)
    assert result["start"] == 3
    assert result["losses"] == pytest.approx([expected[s] for s in (4, 5, 6)], rel=1e-5)
    sharded = OfflineCheckpoint(tmp_path / "sharded")
    assert sharded.config_dict["stem"]["dp_layout"] == "vocab_sharded"
    assert_same_tensors(first, sharded)
    assert OfflineCheckpoint(tmp_path / "mapped").config_dict["stem"]["storage"] == "mmap"
    assert_same_tensors(first, OfflineCheckpoint(tmp_path / "replicated"))
    # The mmap tier's scratch files went to a temporary dir, not into the source run.
    assert not (full_run.run_dir / "stem_mmap").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name for name, _, _ in steps] + ["run", "resumed"]
    )  # no tmp or scratch dir left


@pytest.mark.parametrize("full_run", ["lazy", "exact"], indirect=True)
def test_safetensors_round_trip_is_bitwise_and_resumes(full_run, tiny_config, parallel, tmp_path):
    source = full_run.run_dir / "checkpoints" / "step_3"
    before = snapshot(source)
    assert main(["to-safetensors", str(source), str(tmp_path / "st"), "--quiet"]) == 0
    src = OfflineCheckpoint(source)
    description = json.loads((tmp_path / "st" / "checkpoint.json").read_text())
    assert description["step"] == 3 and description["data"] == src.metadata["data"]
    assert description["config"] == src.config_dict and description["scalars"] == src.scalars
    assert all(k.startswith(("optim.", "stem_optim.")) for k in description["optimizer_keys"])
    assert any(k.startswith("stem_optim.tables.") for k in description["optimizer_keys"])
    with safe_open(tmp_path / "st" / "checkpoint.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(src.keys())
        for key in src.keys():
            assert torch.equal(f.get_tensor(key), src.read(key)), key

    assert main(["from-safetensors", str(tmp_path / "st"), str(tmp_path / "back")]) == 0
    back = OfflineCheckpoint(tmp_path / "back")
    assert set(back.keys()) == set(src.keys()) and back.scalars == src.scalars
    assert back.metadata == src.metadata
    assert_same_tensors(src, back)
    assert snapshot(source) == before
    resume_matches(tiny_config, parallel, full_run, tmp_path / "back", tmp_path / "resumed")
