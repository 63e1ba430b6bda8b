"""Save and load a full single-process training state through the Checkpointer."""

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.checkpoint.errors import CheckpointExistsError


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(2):
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, rows: torch.Tensor, step: int
) -> dict:
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "sparse": {"table0": {"exp_avg": rows.clone(), "last_settled": step, "mode": "exact"}},
        "rng": {"cpu": torch.get_rng_state()},
    }


def test_raw_state_dicts_round_trip_in_place(tmp_path: Path) -> None:
    model, opt = _trained(0)
    saved = _state(model, opt, torch.randn(7, 4), step=11)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    metadata = {
        "step": 2,
        "config": {"lr": 1e-2, "layers": [1, 3]},
        "data": {"epoch": 0, "index": 96},
    }
    final = ckpt.save(2, saved, metadata)

    assert final == tmp_path / "checkpoints" / "step_2"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert json.loads((final / "metadata.json").read_text()) == metadata

    other_model, other_opt = _trained(1)
    target = _state(other_model, other_opt, torch.zeros(7, 4), step=0)
    target["rng"]["cpu"] = torch.zeros_like(target["rng"]["cpu"])
    weight_before = target["model"]["0.weight"]
    assert not torch.equal(weight_before, saved["model"]["0.weight"])

    assert ckpt.load(tmp_path, target) == metadata
    assert target["model"]["0.weight"] is weight_before  # filled in place
    for key, value in saved["model"].items():
        assert torch.equal(target["model"][key], value), key
    for pid, entry in saved["optim"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(target["optim"]["state"][pid][name], value), (pid, name)
    group = target["optim"]["param_groups"][0]
    assert group["betas"] == (0.8, 0.95) and isinstance(group["betas"], tuple)
    assert group["weight_decay"] == 0.1 and group["params"] == [0, 1, 2, 3]
    assert target["sparse"]["table0"]["last_settled"] == 11
    assert target["sparse"]["table0"]["mode"] == "exact"
    assert torch.equal(target["sparse"]["table0"]["exp_avg"], saved["sparse"]["table0"]["exp_avg"])
    assert torch.equal(target["rng"]["cpu"], saved["rng"]["cpu"])
    assert target["rng"]["cpu"].dtype == torch.uint8


def test_resumed_training_matches_uninterrupted(tmp_path: Path) -> None:
    # The trainer's flow: FQN-keyed state from DCP's helpers on a *fresh* optimizer.
    model, opt = _trained(0)
    model_sd, optim_sd = get_state_dict(model, opt)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(2, {"model": model_sd, "optim": optim_sd}, {"step": 2})

    torch.manual_seed(5)
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    fresh_model_sd, fresh_optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": fresh_model_sd, "optim": fresh_optim_sd}
    ckpt.load(tmp_path / "checkpoints", state)
    set_state_dict(
        fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )

    batch = torch.randn(4, 6)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(batch).square().sum().backward()
        o.step()
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_refuses_to_overwrite_and_moves_latest(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(1, {"w": torch.ones(3)}, {"step": 1})
    with pytest.raises(CheckpointExistsError, match="step_1 already exists"):
        ckpt.save(1, {"w": torch.zeros(3)}, {"step": 1})

    ckpt.save(5, {"w": torch.full((3,), 5.0)}, {"step": 5})
    assert ckpt.latest() == tmp_path / "checkpoints" / "step_5"
    state = {"w": torch.empty(3)}
    assert ckpt.load(tmp_path / "checkpoints" / "step_1", state) == {"step": 1}
    assert torch.equal(state["w"], torch.ones(3))  # the refused save changed nothing
    assert ckpt.load(tmp_path, state) == {"step": 5}
    assert torch.equal(state["w"], torch.full((3,), 5.0))


def test_stale_tmp_ignored_by_load_and_removed_by_next_save(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root)
    assert ckpt.latest() is None
    ckpt.save(1, {"w": torch.ones(2)}, {"step": 1})
    stale = root / ".tmp_step_9_deadbeef"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    (root / ".tmp_latest_0badf00d").write_text("step_9\n")

    assert ckpt.latest() == root / "step_1"
    ckpt.save(2, {"w": torch.ones(2)}, {"step": 2})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1", "step_2"]


def test_invalid_state_or_metadata_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root)
    with pytest.raises(TypeError, match="'opt.extra' is a set"):
        ckpt.save(1, {"w": torch.ones(2), "opt": {"extra": {1, 2}}}, {})
    with pytest.raises(TypeError, match="not JSON serializable"):
        ckpt.save(1, {"w": torch.ones(2)}, {"when": object()})
    with pytest.raises(ValueError, match="non-negative int"):
        ckpt.save(-1, {"w": torch.ones(2)}, {})
    assert not root.exists() or list(root.iterdir()) == []
