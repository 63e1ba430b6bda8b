"""Loads are refused, before any tensor is touched, when keys or shapes differ."""

from pathlib import Path

import pytest
import torch

from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.checkpoint.errors import CheckpointMismatchError


@pytest.fixture
def ckpt(tmp_path: Path) -> Checkpointer:
    c = Checkpointer(tmp_path / "checkpoints")
    state = {
        "model": {
            "embed.weight": torch.ones(10, 4),
            "fc1.weight": torch.ones(8, 4),
            "fc2.weight": torch.ones(4, 8),
        },
        "sparse": {"step": 3},
    }
    c.save(1, state, {"step": 1})
    return c


def _expected(**overrides: torch.Tensor) -> dict:
    model = {
        "embed.weight": torch.zeros(10, 4),
        "fc1.weight": torch.zeros(8, 4),
        "fc2.weight": torch.zeros(4, 8),
    }
    model.update(overrides)
    return {"model": model, "sparse": {"step": 0}}


def test_first_shape_mismatch_named_with_both_shapes(ckpt: Checkpointer) -> None:
    state = _expected(**{"fc1.weight": torch.zeros(16, 4), "fc2.weight": torch.zeros(4, 16)})
    with pytest.raises(CheckpointMismatchError) as info:
        ckpt.load(ckpt.dir, state)
    err = info.value
    assert (err.key, err.checkpoint_shape, err.expected_shape) == (
        "model.fc1.weight",
        (8, 4),
        (16, 4),
    )
    assert "'model.fc1.weight'" in str(err) and "[8, 4]" in str(err) and "[16, 4]" in str(err)
    # Nothing was loaded: tensors whose shapes matched are still zero, scalars untouched.
    assert torch.count_nonzero(state["model"]["embed.weight"]) == 0
    assert state["sparse"]["step"] == 0


def test_missing_and_unexpected_keys_named(ckpt: Checkpointer) -> None:
    state = _expected()
    del state["model"]["fc2.weight"]
    state["model"]["fc3.weight"] = torch.zeros(2)
    state["sparse"]["rows_seen"] = 0
    with pytest.raises(CheckpointMismatchError) as info:
        ckpt.load(ckpt.dir, state)
    assert info.value.key is None
    assert info.value.missing == ["model.fc3.weight", "sparse.rows_seen"]
    assert info.value.unexpected == ["model.fc2.weight"]
    assert "missing from checkpoint (2): 'model.fc3.weight', 'sparse.rows_seen'" in str(info.value)
    assert "unexpected in checkpoint (1): 'model.fc2.weight'" in str(info.value)


def test_tensor_where_scalar_expected_is_refused(ckpt: Checkpointer) -> None:
    state = _expected()
    state["sparse"]["step"] = torch.zeros(())
    with pytest.raises(
        CheckpointMismatchError,
        match="'sparse.step' is a scalar in the checkpoint, expected a tensor",
    ):
        ckpt.load(ckpt.dir, state)


def test_non_strict_loads_the_overlap_but_still_checks_shapes(ckpt: Checkpointer) -> None:
    state = {"model": {"embed.weight": torch.zeros(10, 4), "new_head.weight": torch.zeros(3)}}
    assert ckpt.load(ckpt.dir, state, strict=False) == {"step": 1}
    assert torch.equal(state["model"]["embed.weight"], torch.ones(10, 4))
    assert torch.equal(state["model"]["new_head.weight"], torch.zeros(3))
    with pytest.raises(CheckpointMismatchError, match="'model.embed.weight'"):
        ckpt.load(ckpt.dir, {"model": {"embed.weight": torch.zeros(11, 4)}}, strict=False)
