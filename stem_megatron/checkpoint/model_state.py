"""The layout-independent view of a model and its optimizer states that checkpoints store.

Every tensor is saved as its full logical tensor: a TP-sharded parameter (or optimizer state
of one) is wrapped as a DTensor sharded over the tensor-parallel mesh, so DCP records global
offsets and any TP/PP/DP layout can load it. megatron's fused [gate; up] `linear_fc1` is
stored as [2, d_ff, h] sharded on dim 1 (each rank holds [gate_r; up_r]), a shape that means
the same thing under every TP size. Hyperparameters are not saved: they come from the config.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from stem_megatron.model.sharding import TPShard, get_tp_shard


def tp_mesh(group: dist.ProcessGroup, device: torch.device) -> DeviceMesh:
    return DeviceMesh.from_group(group, device.type)


def checkpoint_view(tensor: torch.Tensor, shard: TPShard | None, mesh: DeviceMesh) -> torch.Tensor:
    """`tensor` (a rank's local slice) as the piece of its full logical tensor. Shares storage,
    so DCP loads into it in place."""
    local = tensor.detach()
    if shard is None:
        return local
    dim = shard.dim
    if shard.chunks > 1:
        shape = list(local.shape)
        local = local.view(*shape[:dim], shard.chunks, shape[dim] // shard.chunks, *shape[dim + 1:])
        dim += 1
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False)


def model_state(named_params, mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """{name: checkpoint view} for an iterable of (name, parameter)."""
    return {name: checkpoint_view(p, get_tp_shard(p), mesh) for name, p in named_params}


def wrap_optimizer_states(states: dict[str, dict], params: dict[str, torch.Tensor],
                          mesh: DeviceMesh) -> dict:
    """Per-parameter optimizer states {key: {name: tensor}} in checkpoint views, `params[key]`
    being the parameter they belong to: tensors shaped like it take its sharding; scalars
    (AdamW's `step`) stay as they are."""
    wrapped = {}
    for fqn, state in states.items():
        param = params[fqn]
        wrapped[fqn] = {
            key: checkpoint_view(value, get_tp_shard(param), mesh)
            if isinstance(value, torch.Tensor) and value.shape == param.shape else value
            for key, value in state.items()}
    return wrapped


def unwrap(value):
    """The local tensor behind a checkpoint view (nested dicts are walked)."""
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, DTensor):
        return value.to_local()
    return value
