"""What a checkpoint holds for a training run, and how it is put back.

The DCP part: model parameters (by megatron-core names), the dense AdamW state keyed by
parameter name (torch's distributed state_dict helpers, which also create the optimizer's
lazy state so a fresh optimizer can be loaded into), the sparse table optimizer state and
each rank's RNG state. The JSON part (`metadata.json`): step, data-stream position and the
resolved config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.config import RunConfig
from stem_megatron.data.sampler import PackedSampleStream
from stem_megatron.parallel.state import ParallelState
from stem_megatron.training.optimizer import TrainingOptimizer


class TrainingState:
    def __init__(self, model: torch.nn.Module, optimizer: TrainingOptimizer,
                 train_stream: PackedSampleStream, parallel: ParallelState):
        self.model, self.optimizer = model, optimizer
        self.train_stream, self.parallel = train_stream, parallel

    def _rng_key(self) -> str:
        return f"torch_rank{self.parallel.rank}"  # per-rank keys: DCP must not dedupe them

    def _state(self) -> dict:
        return {
            "model": {name: p.detach() for name, p in self.model.named_parameters()},
            "optim": get_optimizer_state_dict(self.model, self.optimizer.dense),
            "stem_optim": self.optimizer.sparse.state_dict(),
            "rng": {self._rng_key(): torch.get_rng_state()},
        }

    def save(self, checkpointer: Checkpointer, step: int, config: RunConfig) -> Path:
        metadata = {"step": step, "data": self.train_stream.state_dict(),
                    "config": config.to_dict()}
        return checkpointer.save(step, self._state(), metadata)

    def load(self, checkpointer: Checkpointer, path: str) -> int:
        """Restore everything from the checkpoint at `path`; returns its step."""
        state = self._state()
        metadata = checkpointer.load(path, state)
        set_optimizer_state_dict(self.model, self.optimizer.dense, state["optim"])
        self.optimizer.sparse.load_state_dict(state["stem_optim"])
        torch.set_rng_state(state["rng"][self._rng_key()])
        self.train_stream.load_state_dict(metadata["data"])
        return int(metadata["step"])
