"""What a checkpoint holds for a training run, and how it is put back.

The DCP part, every tensor in its layout-independent view (checkpoint/model_state.py): model
parameters by megatron-core name, the dense AdamW state per parameter name, the table
optimizer state, and each rank's RNG state. Optimizer hyperparameters are not saved (they come
from the config), which keeps every key meaning the same thing under any TP/PP/DP layout.
The JSON part (`metadata.json`): step, data-stream position and the resolved config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from stem_megatron.checkpoint.dcp import Checkpointer, resolve
from stem_megatron.checkpoint.model_state import (model_state, tp_mesh, unwrap,
                                                  wrap_optimizer_states)
from stem_megatron.checkpoint.safe_io import read_dcp_metadata
from stem_megatron.config import RunConfig
from stem_megatron.data.sampler import PackedSampleStream
from stem_megatron.parallel.state import ParallelState
from stem_megatron.training.optimizer import TrainingOptimizer


class TrainingState:
    def __init__(self, model: torch.nn.Module, optimizer: TrainingOptimizer,
                 train_stream: PackedSampleStream, parallel: ParallelState):
        self.model, self.optimizer = model, optimizer
        self.train_stream, self.parallel = train_stream, parallel
        self.mesh = tp_mesh(parallel.tp_group, parallel.device)

    def _rng_key(self) -> str:
        return f"torch_rank{self.parallel.rank}"  # per-rank keys: DCP must not dedupe them

    def _state(self) -> tuple[dict, dict]:
        """(checkpoint state, the dense optimizer's full state dict it was taken from)."""
        dense = get_optimizer_state_dict(self.model, self.optimizer.dense)
        sparse = self.optimizer.sparse.state_dict()  # settles exact-mode debts first
        tables = {name: t.weight for name, t in self.optimizer.tables.items()}
        state = {
            "model": model_state(self.model, self.mesh),
            "optim": wrap_optimizer_states(dense["state"], dict(self.model.named_parameters()),
                                           self.mesh),
            "stem_optim": {"step": sparse["step"],
                           "tables": wrap_optimizer_states(sparse["tables"], tables, self.mesh)},
            "rng": {self._rng_key(): torch.get_rng_state()},
        }
        return state, dense

    def save(self, checkpointer: Checkpointer, step: int, config: RunConfig) -> Path:
        metadata = {"step": step, "data": self.train_stream.state_dict(),
                    "config": config.to_dict()}
        return checkpointer.save(step, self._state()[0], metadata)

    def load(self, checkpointer: Checkpointer, path: str) -> int:
        """Restore everything from the checkpoint at `path`; returns its step. A checkpoint
        from another world size has other ranks' RNG states: every rank reads all of them
        (so the load stays strict) and takes its own if there is one."""
        state, dense = self._state()
        stored = read_dcp_metadata(resolve(path)).state_dict_metadata
        state["rng"] = {key.split(".", 1)[1]: torch.empty(tuple(meta.size), dtype=torch.uint8)
                        for key, meta in stored.items() if key.startswith("rng.")}
        metadata = checkpointer.load(path, state)
        dense["state"] = unwrap(state["optim"])
        set_optimizer_state_dict(self.model, self.optimizer.dense, dense)
        self.optimizer.sparse.load_state_dict(unwrap(state["stem_optim"]))
        if self._rng_key() in state["rng"]:
            torch.set_rng_state(state["rng"][self._rng_key()])
        self.train_stream.load_state_dict(metadata["data"])
        return int(metadata["step"])
