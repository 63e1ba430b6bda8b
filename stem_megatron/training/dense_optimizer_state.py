"""The dense optimizer's state per parameter name, whichever megatron-core optimizer holds it.

A checkpoint stores each dense parameter's exact fp32 values under `model.<name>` and Adam's
state under `optim.<name>.{step,exp_avg,exp_avg_sq}` (the keys torch AdamW's checkpoints had),
every tensor as its full logical tensor (checkpoint/model_state.py). Where those values live
depends on what `get_megatron_optimizer` built (a ChainedOptimizer of one or more of):

- FP32Optimizer: the fp32 parameter itself; its state is keyed by it.
- Float16OptimizerWithFloat16Params (train.bf16): an fp32 main copy of each bf16 parameter.
  `model.<name>` stores that copy, not the rounded bf16 weights, so a resume in any precision
  and every tool reading the checkpoint get the exact values.
- DistributedOptimizer: fp32 main values and moments of a flat range of the parameter (its
  elements in this data-parallel rank's part of a grad bucket), saved and loaded as that range
  of the full tensor (checkpoint/flat_shard.py): nothing is gathered, nothing is copied.

So a checkpoint saved with one of them loads into any other, under any TP/PP/DP layout.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core.optimizer import (
    DistributedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MegatronOptimizer,
)
from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer
from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

from stem_megatron.checkpoint.flat_shard import flat_shard_view
from stem_megatron.checkpoint.model_state import CheckpointMeshes, checkpoint_view
from stem_megatron.sharding import is_tied_copy


@dataclass(frozen=True)
class _Held:
    """What the optimizer holds of one parameter on this rank: `main`, the fp32 values it
    steps, is elements [start, start + main.numel()) of the flattened parameter; `adam` keeps
    their state under `key` (main itself, or the copy an offloading optimizer steps)."""

    param: torch.nn.Parameter
    main: torch.Tensor
    start: int
    adam: torch.optim.Optimizer
    key: torch.Tensor
    group: dict

    @property
    def whole(self) -> bool:
        return self.main.numel() == self.param.numel()


def _parts(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _param_and_main(
    part: MegatronOptimizer,
) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor, int]]:
    """(model parameter, its main values, their flat offset in it) for each parameter `part`
    steps on this rank."""
    if getattr(part, "is_stub_optimizer", False):
        return
    if isinstance(part, DistributedOptimizer):
        pairs = (
            (part.model_float16_groups, part.shard_fp32_from_float16_groups),
            (part.model_fp32_groups, part.shard_fp32_groups),
        )
        for params, mains in pairs:
            for param, main in zip(itertools.chain(*params), itertools.chain(*mains)):
                yield param, main, part._get_model_param_range_map(param)["param"].start
    elif isinstance(part, Float16OptimizerWithFloat16Params):
        pairs = (
            (part.float16_groups, part.fp32_from_float16_groups),
            (part.fp32_from_fp32_groups, part.fp32_from_fp32_groups),
        )
        for params, mains in pairs:
            for param, main in zip(itertools.chain(*params), itertools.chain(*mains)):
                yield param, main, 0
    elif isinstance(part, FP32Optimizer):
        for group in part.optimizer.param_groups:
            for param in group["params"]:
                yield param, param, 0
    else:
        raise TypeError(
            f"checkpoints cannot read the state of megatron-core's {type(part).__name__}"
        )


def _state_holders(adam: torch.optim.Optimizer) -> dict[int, tuple]:
    """By id of each tensor `adam` steps: (the optimizer keeping its state, the tensor that
    state is keyed by, its param group). HybridDeviceOptimizer (optim.optimizer_cpu_offload)
    hands a host or fp32 copy of each tensor to one of its sub-optimizers, which keep the
    state; it collects their states into its own only after each step."""
    if not isinstance(adam, HybridDeviceOptimizer):
        return {id(p): (adam, p, g) for g in adam.param_groups for p in g["params"]}
    inner = {id(copy): main for main, copy in adam.param_to_inner_param.items()}
    return {
        id(inner[id(p)]): (sub, p, g)
        for sub in adam.sub_optimizers
        for g in sub.param_groups
        for p in g["params"]
    }


def _per_param_step(adam: torch.optim.Optimizer) -> bool:
    """torch's Adam counts steps per parameter state; TE's and apex's FusedAdam per group."""
    return isinstance(adam, (torch.optim.Adam, torch.optim.AdamW))


class DenseOptimizerState:
    """Checkpoint views of megatron-core's dense optimizer (DenseOptimizer.megatron) over
    `params`, the dense parameters by name. Build one per save or load: it reads the
    optimizer's current tensors."""

    def __init__(
        self,
        optimizer: MegatronOptimizer,
        params: dict[str, torch.nn.Parameter],
        meshes: CheckpointMeshes,
    ):
        self.params, self.meshes = params, meshes
        self.parts = _parts(optimizer)
        names = {id(p): name for name, p in params.items()}
        self.held: dict[str, _Held] = {}
        for part in self.parts:
            if getattr(part, "is_stub_optimizer", False):
                continue
            holders = _state_holders(part.optimizer)
            for param, main, start in _param_and_main(part):
                adam, key, group = holders[id(main)]
                self.held[names[id(param)]] = _Held(param, main, start, adam, key, group)
        self._created: list[_Held] = []  # states made by optimizer_views for a fresh optimizer
        self._group_steps: list[tuple[dict, torch.Tensor]] = []

    def _view(self, tensor: torch.Tensor, held: _Held) -> torch.Tensor:
        if held.whole:
            return checkpoint_view(tensor.view(held.param.shape), held.param, self.meshes)
        return flat_shard_view(tensor, held.param, held.start, self.meshes)

    def model_views(self, saving: bool) -> dict[str, torch.Tensor]:
        """`model.<name>` of each dense parameter: its fp32 values. An fp32 parameter is
        whole on every rank (a distributed optimizer's range of it is a view of it); a bf16
        one is stored as its fp32 main copy, or as the range of it this rank holds. Saving
        skips the last stage's copy of the tied embedding: the first stage's is the same
        tensor, and as a range of another grad buffer it would overlap it."""
        views = {}
        for name, param in self.params.items():
            if saving and is_tied_copy(param):
                continue
            if param.dtype == torch.float32:
                views[name] = checkpoint_view(param, param, self.meshes)
            elif name in self.held:
                views[name] = self._view(self.held[name].main, self.held[name])
        return views

    def optimizer_views(self, saving: bool) -> dict[str, dict[str, torch.Tensor]]:
        """`optim.<name>.{step,exp_avg,exp_avg_sq}` for each parameter this rank holds state
        of. A parameter without state yet (a fresh optimizer about to be loaded into) gets
        Adam's initial state, as its first step would create it, so a checkpoint loads into it
        in place; `forget_created` takes it back."""
        views = {}
        for name, held in self.held.items():
            if saving and is_tied_copy(held.param):
                continue
            state = held.adam.state[held.key]
            if not state:
                self._create_state(held, state)
            views[name] = {
                "step": self._step(held, state),
                "exp_avg": self._view(state["exp_avg"], held),
                "exp_avg_sq": self._view(state["exp_avg_sq"], held),
            }
        return views

    def _create_state(self, held: _Held, state: dict) -> None:
        if _per_param_step(held.adam):
            on_device = held.group.get("fused") or held.group.get("capturable")
            state["step"] = torch.zeros(
                (), dtype=torch.float32, device=held.key.device if on_device else "cpu"
            )
        state["exp_avg"] = torch.zeros_like(held.key, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(held.key, memory_format=torch.preserve_format)
        self._created.append(held)

    def _step(self, held: _Held, state: dict) -> torch.Tensor:
        if _per_param_step(held.adam):
            return state["step"]
        step = torch.tensor(float(held.group.get("step", 0)))
        self._group_steps.append((held.group, step))  # written back by `loaded`
        return step

    def forget_created(self) -> None:
        """Drop the initial states `optimizer_views` created: a fresh optimizer stays fresh."""
        for held in self._created:
            held.adam.state.pop(held.key, None)
        self._created = []

    def loaded(self) -> None:
        """After a checkpoint was loaded into the views: group step counts back into a fused
        Adam, an offloading optimizer's copies of the main values refreshed, and bf16
        parameters rounded from their loaded main values (under the distributed optimizer each
        rank rounds its range, then the ranges are all-gathered over DP)."""
        for group, step in self._group_steps:
            group["step"] = int(step.item())
        for part in self.parts:
            if getattr(part, "is_stub_optimizer", False):
                continue
            if isinstance(part.optimizer, HybridDeviceOptimizer):  # its copies of the mains
                for main, copy in part.optimizer.param_to_inner_param.items():
                    if copy is not main:
                        copy.data.copy_(main.data)
                part.optimizer._sync_sub_optimizers_state_to_hdo()
            if isinstance(part, MixedPrecisionOptimizer):
                part._copy_main_params_to_model_params()
            if isinstance(part, DistributedOptimizer):
                for chunk in part.model_chunks:
                    chunk.start_param_sync(force_sync=True)
