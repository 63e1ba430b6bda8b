"""checkpoint.finetune: a run starts from another checkpoint's model weights only (fresh
optimizer, step 0, data from the start); requeued, it resumes its own checkpoints in full."""

from __future__ import annotations

import json

import pytest
import torch

from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.checkpoint.errors import CheckpointMismatchError
from stem_megatron.checkpoint.layout import MODEL_ONLY
from stem_megatron.checkpoint.model_state import CheckpointMeshes, model_state
from stem_megatron.config import ConfigError
from stem_megatron.training.model_chunks import named_parameters
from stem_megatron.training.trainer import Trainer


def params_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in named_parameters(trainer.chunks)}


@pytest.fixture
def source_run(tiny_config, parallel):
    """A trained STEM run (exact mode: tables, moments and steps all non-trivial)."""
    config = tiny_config(
        "train.train_iters=3", "train.eval_interval=0", "stem.optimizer.mode=exact"
    )
    trainer = Trainer(config, parallel)
    trainer.run()
    return config.run_dir / "checkpoints" / "step_3", params_of(trainer)


def test_finetune_takes_weights_only_and_a_requeue_resumes_in_full(
    tiny_config, parallel, tmp_path, source_run
):
    checkpoint, trained = source_run
    overrides = (
        f"checkpoint.load={checkpoint}",
        "checkpoint.finetune=true",
        f"logging.run_dir={tmp_path / 'ft'}",
        "train.train_iters=2",
        "train.eval_interval=0",
        "train.seed=99",
    )
    trainer = Trainer(tiny_config(*overrides), parallel)
    assert trainer.step == 0
    loaded = params_of(trainer)
    assert loaded.keys() == trained.keys()
    for name in trained:  # the seed differs, so only a load can make these equal
        assert torch.equal(loaded[name], trained[name]), name
    assert not trainer.optimizer.parts[0].optimizer.state  # fresh AdamW
    assert trainer.tables.optimizer.step_count == 0
    fresh = Trainer(tiny_config(*overrides[2:]), parallel)  # same data seed, no load
    assert trainer.train_stream.state_dict() == fresh.train_stream.state_dict()
    trainer.run()
    saved = json.loads((tmp_path / "ft/checkpoints/step_2/metadata.json").read_text())
    assert saved["step"] == 2

    requeued = Trainer(tiny_config(*overrides[:3], "train.train_iters=4", *overrides[4:]), parallel)
    assert requeued.step == 2  # its own latest checkpoint, optimizer and all
    assert requeued.tables.optimizer.step_count == 2


@pytest.mark.parametrize("storage", ["device", "host"])
def test_model_only_checkpoint_starts_a_finetune_but_cannot_be_resumed(
    tiny_config, parallel, tmp_path, storage
):
    base = tiny_config("train.train_iters=1", "optim.lr_warmup_iters=0", f"stem.storage={storage}")
    source = Trainer(base, parallel)
    path = Checkpointer(tmp_path / "weights").save(
        0,
        {
            "model": model_state(
                named_parameters(source.chunks), CheckpointMeshes.single(torch.device("cpu"))
            )
        },
        {"step": 0, "data": None, "config": base.to_dict(), MODEL_ONLY: True},
    )
    with pytest.raises(ValueError, match="model weights only.*checkpoint.finetune=true"):
        Trainer(
            tiny_config(f"checkpoint.load={path}", f"logging.run_dir={tmp_path / 'a'}"), parallel
        )
    trainer = Trainer(
        tiny_config(
            f"checkpoint.load={path}",
            "checkpoint.finetune=true",
            f"logging.run_dir={tmp_path / 'b'}",
            "train.seed=7",
            f"stem.storage={storage}",
        ),
        parallel,
    )
    assert trainer.step == 0
    for name, p in params_of(source).items():
        assert torch.equal(params_of(trainer)[name], p)
    assert trainer.run().step == 6  # host tables: rows staged from the loaded table


def test_finetune_needs_a_load_path_and_matching_parameters(tiny_config, parallel, tmp_path):
    with pytest.raises(ConfigError, match="finetune=true needs checkpoint.load"):
        tiny_config("checkpoint.finetune=true")
    with pytest.raises(ConfigError, match="finetune=true needs checkpoint.load"):
        tiny_config("checkpoint.finetune=true", "checkpoint.load=auto")
    dense = tiny_config(
        "stem.enabled=false",
        "train.train_iters=1",
        "train.eval_interval=0",
        "optim.lr_warmup_iters=0",
    )
    Trainer(dense, parallel).run()
    with pytest.raises(CheckpointMismatchError, match="lacks model parameters.*stem_table"):
        Trainer(
            tiny_config(
                f"checkpoint.load={dense.run_dir}",
                "checkpoint.finetune=true",
                f"logging.run_dir={tmp_path / 'stem'}",
            ),
            parallel,
        )
