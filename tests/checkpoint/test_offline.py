"""Offline checkpoint access: list, read and rewrite a real training checkpoint on one
process, and train from / generate with the rewritten one."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.checkpoint import layout
from stem_megatron.checkpoint.errors import CheckpointExistsError, CheckpointNotFoundError
from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.checkpoint.offline import OfflineCheckpoint, write_checkpoint
from stem_megatron.training.trainer import Trainer

TABLE = "model.decoder.layers.1.mlp.stem_table.weight"


@pytest.fixture
def trained(tiny_config, parallel):
    config = tiny_config("train.train_iters=3", "train.eval_interval=0")
    trainer = Trainer(config, parallel)
    trainer.run()
    return config, trainer


def test_lists_and_reads_full_tensors(trained):
    config, trainer = trained
    ckpt = OfflineCheckpoint(config.run_dir)  # a run dir resolves to its latest checkpoint
    assert ckpt.path.name == "step_3" and ckpt.step == 3
    assert ckpt.scalars == {"stem_optim.step": 3}
    infos = ckpt.infos()
    params = dict(trainer.chunks[0].named_parameters())
    for name, param in params.items():
        info = infos[f"model.{name}"]
        assert info.kind == "model" and info.dtype == param.dtype
        stored = ckpt.read(f"model.{name}")
        # The fused [gate; up] fc1 of a dense layer is stored as [2, d_ff, h].
        torch.testing.assert_close(stored.reshape(param.shape), param.detach(), rtol=0, atol=0)
    kinds = {info.kind for info in infos.values()}
    assert kinds == {"model", "dense optimizer", "table optimizer", "rng"}
    assert infos["model.decoder.layers.0.mlp.linear_fc1.weight"].shape == (2, 64, 32)
    assert sum(1 for _ in ckpt.tensors()) == len(ckpt.keys())


def test_written_checkpoint_loads_for_inference_and_training(
    trained, tiny_config, parallel, tmp_path
):
    config, _ = trained
    ckpt = OfflineCheckpoint(config.run_dir)
    tensors = dict(ckpt.tensors())
    tensors[TABLE] = tensors[TABLE].clone()
    tensors[TABLE][[5, 7]] = tensors[TABLE][[7, 5]]  # an edit: swap two rows
    out = tmp_path / "edited" / "checkpoints"
    step_dir = write_checkpoint(out, tensors, ckpt.metadata, ckpt.scalars)
    assert step_dir == out / "step_3" and layout.resolve(out) == step_dir
    assert not [p for p in out.parent.iterdir() if p.name.startswith(layout.TMP_PREFIX)]
    written = OfflineCheckpoint(out)
    for key in ckpt.keys():
        assert torch.equal(written.read(key), tensors[key]), key

    loaded = load_for_inference(str(out))
    assert torch.equal(
        dict(loaded.model.named_parameters())[TABLE[len("model.") :]], tensors[TABLE]
    )
    resumed = tiny_config(
        f"checkpoint.load={out}",
        f"logging.run_dir={tmp_path / 'resumed'}",
        "train.train_iters=4",
        "train.eval_interval=0",
    )
    trainer = Trainer(resumed, parallel)
    assert trainer.step == 3
    assert torch.equal(
        dict(trainer.chunks[0].named_parameters())[TABLE[len("model.") :]], tensors[TABLE]
    )
    trainer.run()
    assert OfflineCheckpoint(tmp_path / "resumed").step == 4
    assert torch.equal(
        OfflineCheckpoint(config.run_dir).read(TABLE), ckpt.read(TABLE)
    )  # input kept


def test_bad_paths(trained, tmp_path):
    config, _ = trained
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint path"):
        OfflineCheckpoint(tmp_path / "nowhere")
    partial = tmp_path / "partial" / "step_3"
    partial.mkdir(parents=True)
    (partial / ".metadata").write_bytes(
        (config.run_dir / "checkpoints/step_3/.metadata").read_bytes()
    )
    with pytest.raises(CheckpointNotFoundError, match="missing scalars.json, metadata.json"):
        OfflineCheckpoint(partial)
    ckpt = OfflineCheckpoint(config.run_dir)
    with pytest.raises(KeyError, match="no tensor"):
        ckpt.read("model.nothing")
    exists = tmp_path / "exists"
    exists.mkdir()
    with pytest.raises(CheckpointExistsError, match="already exists"):
        write_checkpoint(exists, {}, ckpt.metadata)
    assert list(exists.iterdir()) == []
