"""Flattening a nested state into dotted keys and writing scalars back."""

import pytest
import torch

from stem_megatron.checkpoint.flatten import flatten_state, restore_scalars


def test_flatten_splits_tensors_and_scalars_with_dotted_keys() -> None:
    w = torch.ones(2)
    state = {
        "model": {"layers.0.weight": w},
        "optim": {"state": {3: {"step": 4}}, "groups": [{"betas": (0.9, 0.99)}]},
    }
    tensors, scalars = flatten_state(state)
    assert list(tensors) == ["model.layers.0.weight"] and tensors["model.layers.0.weight"] is w
    assert scalars == {
        "optim.state.3.step": 4,
        "optim.groups.0.betas.0": 0.9,
        "optim.groups.0.betas.1": 0.99,
    }


def test_colliding_paths_and_bad_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="same key 'a.b'"):
        flatten_state({"a.b": torch.ones(1), "a": {"b": 2}})
    with pytest.raises(ValueError, match="same key 'x.0'"):
        flatten_state({"x": {0: 1, "0": 2}})
    with pytest.raises(TypeError, match="keys must be str or int"):
        flatten_state({"x": {(1, 2): 1}})


def test_restore_scalars_keeps_containers_and_rebuilds_tuples() -> None:
    groups = [{"lr": 0.0, "betas": (0.0, 0.0), "params": [0, 1]}]
    state = {"optim": {"state": {0: {"step": 0}}, "param_groups": groups}}
    restore_scalars(
        state,
        {
            "optim.state.0.step": 9,
            "optim.param_groups.0.betas.1": 0.5,
            "optim.param_groups.0.lr": 0.1,
        },
    )
    assert state["optim"]["param_groups"] is groups  # same list object, updated in place
    assert groups[0] == {"lr": 0.1, "betas": (0.0, 0.5), "params": [0, 1]}
    assert isinstance(groups[0]["betas"], tuple)
    assert state["optim"]["state"][0]["step"] == 9
