"""The layout-independent view of a model and its optimizer states that checkpoints store.

Every tensor is saved as its full logical tensor: a TP-sharded parameter (or optimizer state
of one) is wrapped as a DTensor sharded over the tensor-parallel mesh, so DCP records global
offsets and any TP/PP/DP layout can load it. megatron's fused [gate; up] `linear_fc1` is
stored as [2, d_ff, h] sharded on dim 1 (each rank holds [gate_r; up_r]), a shape that means
the same thing under every TP size. A vocab-sharded STEM table is sharded twice: rows over
the data-parallel ranks, columns over the tensor-parallel ones. Hyperparameters are not
saved: they come from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from stem_megatron.sharding import full_shape, get_row_block, get_tp_shard


@dataclass(frozen=True)
class CheckpointMeshes:
    tp: DeviceMesh  # this rank's tensor-parallel group
    dp_tp: DeviceMesh | None = None  # [dp, tp] ranks of this pipeline stage (vocab-sharded tables)
    # The same groups for tensors in host memory when the compute device is not the host: a
    # DTensor moves its local tensor to its mesh's device, so a host table (or its moments)
    # viewed through the compute meshes would be copied to the GPU to be saved, and loaded
    # into that copy instead of into the table.
    host: CheckpointMeshes | None = None

    @classmethod
    def build(cls, parallel, device_type: str | None = None) -> CheckpointMeshes:
        """The meshes of this rank (a ParallelState) on its compute device (or `device_type`),
        with host meshes beside them when that is not the CPU. Its stage's [dp, tp] grid of
        global ranks comes from the rank grid (parallel/dims.py), with no collective."""
        device = device_type or parallel.device.type
        tp = DeviceMesh.from_group(parallel.tp_group, device)
        dp_tp = None
        if parallel.dp_size > 1:
            grid = torch.tensor(parallel.grid.stage_ranks(parallel.pp_rank), dtype=torch.int)
            dp_tp = DeviceMesh.from_group(
                [parallel.dp_group, parallel.tp_group],
                device,
                mesh=grid,
                mesh_dim_names=("dp", "tp"),
            )
        host = None if device == "cpu" else cls.build(parallel, "cpu")
        return cls(tp, dp_tp, host)

    def where(self, tensor: torch.Tensor) -> CheckpointMeshes:
        """The meshes of the device `tensor` lives on: it is saved from and loaded into there."""
        if self.host is not None and tensor.device.type == "cpu":
            return self.host
        return self

    @classmethod
    def single(cls, device: torch.device) -> CheckpointMeshes:
        return cls(DeviceMesh.from_group(dist.group.WORLD, device.type))


def tp_block(like: torch.Tensor) -> tuple[tuple[int, ...], int | None]:
    """The shape this rank's piece of parameter `like` takes in its checkpoint view, and the
    dimension of that view split over the tensor-parallel ranks (None: not split)."""
    shape, shard = tuple(like.shape), get_tp_shard(like)
    if shard is None:
        return shape, None
    dim = shard.dim
    if shard.chunks > 1:
        shape = (*shape[:dim], shard.chunks, shape[dim] // shard.chunks, *shape[dim + 1 :])
        dim += 1
    return shape, dim


def checkpoint_view(
    tensor: torch.Tensor, like: torch.Tensor, meshes: CheckpointMeshes
) -> torch.Tensor:
    """`tensor` (this rank's piece of a parameter `like`, or of an optimizer state shaped like
    it) as a piece of its full logical tensor. Shares storage, so DCP loads into it in place."""
    shape, dim = tp_block(like)
    rows = get_row_block(like)
    if dim is None:
        return tensor.detach()
    meshes = meshes.where(tensor)
    local = tensor.detach().view(shape)
    if rows is None:
        return DTensor.from_local(local, meshes.tp, [Shard(dim)], run_check=False)
    tp_size = meshes.tp.size()
    shape = torch.Size(full_shape(like, tp_size))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, meshes.dp_tp, [Shard(0), Shard(dim)], run_check=False, shape=shape, stride=stride
    )


def model_state(named_params, meshes: CheckpointMeshes) -> dict[str, torch.Tensor]:
    """{name: checkpoint view} for an iterable of (name, parameter)."""
    return {name: checkpoint_view(p, p, meshes) for name, p in named_params}


def wrap_optimizer_states(
    states: dict[str, dict], params: dict[str, torch.Tensor], meshes: CheckpointMeshes
) -> dict:
    """Per-parameter optimizer states {key: {name: tensor}} in checkpoint views, `params[key]`
    being the parameter they belong to: tensors shaped like it take its sharding; scalars
    (AdamW's `step`) stay as they are."""
    wrapped = {}
    for fqn, state in states.items():
        param = params[fqn]
        wrapped[fqn] = {
            key: checkpoint_view(value, param, meshes)
            if isinstance(value, torch.Tensor) and value.shape == param.shape
            else value
            for key, value in state.items()
        }
    return wrapped


def unwrap(value):
    """The local tensor behind a checkpoint view (nested dicts are walked)."""
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, DTensor):
        return value.to_local()
    return value
