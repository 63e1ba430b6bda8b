"""tools/convert_checkpoint.py on bad input: a clear message, exit status 1, the input
untouched and nothing left at (or beside) the output path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stem_megatron.checkpoint.offline import OfflineCheckpoint, write_checkpoint
from stem_megatron.cli.convert_checkpoint import main
from stem_megatron.training.trainer import Trainer
from tests.tools.checkpoint_files import snapshot

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkpoint(tiny_config, parallel):
    config = tiny_config("train.train_iters=2", "train.eval_interval=0")
    Trainer(config, parallel).run()
    return config.run_dir / "checkpoints" / "step_2"


def fails(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err, err


def only_inputs_left(tmp_path: Path, *expected: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)


@pytest.mark.parametrize("command", ["reshard", "to-safetensors"])
def test_missing_and_partial_checkpoints(checkpoint, tmp_path, capsys, command):
    fails(
        capsys,
        [command, str(tmp_path / "nowhere"), str(tmp_path / "out")],
        "no such checkpoint path",
    )
    partial = tmp_path / "partial" / "step_2"
    shutil.copytree(checkpoint, partial)
    (partial / "metadata.json").unlink()
    fails(
        capsys,
        [command, str(partial), str(tmp_path / "out")],
        "is not a complete checkpoint: missing metadata.json",
    )
    only_inputs_left(tmp_path, "run", "partial")


@pytest.mark.parametrize("command", ["reshard", "to-safetensors"])
def test_existing_output_is_refused(checkpoint, tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(capsys, [command, str(checkpoint), str(out)], "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overrides_that_do_not_match_the_tensors(checkpoint, tmp_path, capsys):
    before = snapshot(checkpoint)
    out = tmp_path / "out"
    # Refused before any process starts: a malformed override, an impossible layout.
    fails(
        capsys,
        ["reshard", str(checkpoint), str(out), "parallel.tensor_model_parallel_size"],
        "is not of the form section.key=value",
    )
    fails(
        capsys,
        ["reshard", str(checkpoint), str(out), "parallel.tensor_model_parallel_size=3"],
        "tensor_model_parallel_size",
    )
    # A model of another size: the target world refuses the checkpoint, naming the tensor
    # (overrides may follow options).
    fails(
        capsys,
        ["reshard", str(checkpoint), str(out), "--dp", "1", "model.hidden_size=48"],
        "shape mismatch for 'model.embedding.word_embeddings.weight'",
    )
    assert snapshot(checkpoint) == before
    only_inputs_left(tmp_path, "run")


def test_from_safetensors_bad_input(checkpoint, tmp_path, capsys):
    fails(
        capsys,
        ["from-safetensors", str(checkpoint), str(tmp_path / "out")],
        "is not a consolidated checkpoint: missing checkpoint.safetensors",
    )
    assert main(["to-safetensors", str(checkpoint), str(tmp_path / "st"), "--quiet"]) == 0
    before = snapshot(tmp_path / "st")
    fails(
        capsys, ["from-safetensors", str(tmp_path / "st"), str(tmp_path / "st")], "already exists"
    )
    description = json.loads((tmp_path / "st" / "checkpoint.json").read_text())
    description["model_keys"].append("model.extra.weight")
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "st", edited)
    (edited / "checkpoint.json").write_text(json.dumps(description))
    fails(
        capsys,
        ["from-safetensors", str(edited), str(tmp_path / "out")],
        "lists other tensors than checkpoint.safetensors holds",
    )
    (edited / "checkpoint.safetensors").write_bytes(b"\x01")
    fails(
        capsys,
        ["from-safetensors", str(edited), str(tmp_path / "out")],
        "too short to be a safetensors file",
    )
    assert snapshot(tmp_path / "st") == before
    only_inputs_left(tmp_path, "run", "st", "edited")


def test_model_only_checkpoint(checkpoint, tmp_path, capsys):
    """A model-only checkpoint (as the HF import writes) needs no resharding, and keeps its
    model_only mark through safetensors and back."""
    ckpt = OfflineCheckpoint(checkpoint)
    model = {key: ckpt.read(key) for key in ckpt.keys() if key.startswith("model.")}
    metadata = {"step": 0, "data": None, "config": ckpt.config_dict, "model_only": True}
    write_checkpoint(tmp_path / "weights", model, metadata)
    fails(
        capsys,
        [
            "reshard",
            str(tmp_path / "weights"),
            str(tmp_path / "out"),
            "parallel.tensor_model_parallel_size=2",
        ],
        "holds model weights only",
    )
    assert main(["to-safetensors", str(tmp_path / "weights"), str(tmp_path / "st"), "--quiet"]) == 0
    assert main(["from-safetensors", str(tmp_path / "st"), str(tmp_path / "back"), "--quiet"]) == 0
    back = OfflineCheckpoint(tmp_path / "back")
    assert back.metadata == metadata and set(back.keys()) == set(model)
    for key, tensor in model.items():
        assert torch.equal(back.read(key), tensor), key


def test_command_line_exit_status(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_checkpoint.py"),
            "to-safetensors",
            str(tmp_path / "nowhere"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "error: no such checkpoint path" in result.stderr
