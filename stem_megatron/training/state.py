"""What a checkpoint holds for a training run, and how it is put back.

The DCP part, every tensor in its layout-independent view (checkpoint/model_state.py): model
parameters by megatron-core name (dense ones as the fp32 values the optimizer steps), the dense
Adam state per parameter name, whichever megatron-core optimizer holds it
(dense_optimizer_state.py), the table optimizer state, and each rank's RNG state. Optimizer
hyperparameters are not saved (they come from the config), which keeps every key meaning the
same thing under any TP/PP/DP layout.
The JSON part (`metadata.json`): step, data-stream position, the train losses not yet logged
(training/metrics.py LossWindow) and the resolved config.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from stem_megatron.checkpoint.dcp import Checkpointer, resolve
from stem_megatron.checkpoint.errors import CheckpointMismatchError
from stem_megatron.checkpoint.layout import METADATA_JSON, MODEL_ONLY, read_json
from stem_megatron.checkpoint.model_state import (
    CheckpointMeshes,
    model_state,
    unwrap,
    wrap_optimizer_states,
)
from stem_megatron.checkpoint.safe_io import read_dcp_metadata
from stem_megatron.config import RunConfig
from stem_megatron.data.sampler import PackedSampleStream
from stem_megatron.parallel.state import ParallelState
from stem_megatron.stem.tables import StemTables
from stem_megatron.training.dense_optimizer_state import DenseOptimizerState
from stem_megatron.training.metrics import LossWindow
from stem_megatron.training.model_chunks import named_parameters
from stem_megatron.training.optimizer import DenseOptimizer


class TrainingState:
    def __init__(
        self,
        chunks: list[torch.nn.Module],
        optimizer: DenseOptimizer,
        tables: StemTables,
        train_stream: PackedSampleStream,
        parallel: ParallelState,
    ):
        self.chunks, self.optimizer, self.tables = chunks, optimizer, tables
        self.train_stream, self.parallel = train_stream, parallel
        self.loss_window = LossWindow()
        self.meshes = CheckpointMeshes.build(parallel)

    def _rng_key(self) -> str:
        return f"torch_rank{self.parallel.rank}"  # per-rank keys: DCP must not dedupe them

    def _dense(self) -> DenseOptimizerState:
        dense_ids = {id(p) for p in self.optimizer.params}
        params = {name: p for name, p in named_parameters(self.chunks) if id(p) in dense_ids}
        return DenseOptimizerState(self.optimizer.megatron, params, self.meshes)

    def _model(self, dense: DenseOptimizerState, saving: bool) -> dict[str, torch.Tensor]:
        """`model.*`: the dense parameters' fp32 values (DenseOptimizerState.model_views),
        the tables and any other parameter as they are."""
        others = (
            (name, p) for name, p in named_parameters(self.chunks) if name not in dense.params
        )
        return {**model_state(others, self.meshes), **dense.model_views(saving)}

    def _state(self, dense: DenseOptimizerState, saving: bool) -> dict:
        sparse = self.tables.state_dict()  # settles exact-mode debts first
        tables = self.tables.weights()
        return {
            "model": self._model(dense, saving),
            "optim": dense.optimizer_views(saving),
            "stem_optim": {
                "step": sparse["step"],
                "tables": wrap_optimizer_states(sparse["tables"], tables, self.meshes),
            },
            "rng": {self._rng_key(): torch.get_rng_state()},
        }

    def save(self, checkpointer: Checkpointer, step: int, config: RunConfig) -> Path:
        metadata = {
            "step": step,
            "data": self.train_stream.state_dict(),
            "loss_window": self.loss_window.state_dict(),
            "config": config.to_dict(),
        }
        return checkpointer.save(step, self._state(self._dense(), saving=True), metadata)

    def check_can_save(self, checkpointer: Checkpointer, step: int, train_iters: int) -> None:
        """Before training from `step`: the checkpoint dir is writable, has room for a
        checkpoint of this state, and no step this run may save (any, on a stop signal) is
        taken already. Leaves the optimizer as it found it: the state it sizes fills in
        Adam's initial moments, which a fresh (e.g. finetuning) optimizer must not have yet."""
        dense = self._dense()
        try:
            checkpointer.check_can_save(
                self._state(dense, saving=True), list(range(step + 1, train_iters + 1))
            )
        finally:
            dense.forget_created()

    def _check_optimizer_mode(self, checkpoint: Path) -> None:
        """Refused before anything is read: a model-only checkpoint, and table optimizer
        state of the other mode (StemTables.check_mode)."""
        saved = read_json(checkpoint, METADATA_JSON)
        if saved.get(MODEL_ONLY):
            raise ValueError(
                f"checkpoint {checkpoint} holds model weights only (no optimizer "
                f"or data state): start from it with checkpoint.finetune=true"
            )
        mode = saved.get("config", {}).get("stem", {}).get("optimizer", {}).get("mode")
        self.tables.check_mode(mode, checkpoint)

    def load(self, checkpointer: Checkpointer, path: str) -> int:
        """Restore everything from the checkpoint at `path`; returns its step. A checkpoint
        from another world size has other ranks' RNG states: every rank reads all of them
        (so the load stays strict) and takes its own if there is one."""
        self._check_optimizer_mode(resolve(path))
        dense = self._dense()
        state = self._state(dense, saving=False)
        stored = read_dcp_metadata(resolve(path)).state_dict_metadata
        state["rng"] = {
            key.split(".", 1)[1]: torch.empty(tuple(meta.size), dtype=torch.uint8)
            for key, meta in stored.items()
            if key.startswith("rng.")
        }
        metadata = checkpointer.load(path, state)  # model and Adam states load in place
        dense.loaded()
        self.tables.load_state_dict(unwrap(state["stem_optim"]))
        if self._rng_key() in state["rng"]:
            torch.set_rng_state(state["rng"][self._rng_key()])
        self.train_stream.load_state_dict(metadata["data"])
        if "loss_window" in metadata:  # older checkpoints: the window starts at the resume
            self.loss_window.load_state_dict(metadata["loss_window"])
        return int(metadata["step"])

    def load_model_weights(self, path: str) -> None:
        """Finetune start: the model parameters of the checkpoint at `path`, nothing else
        (optimizer, step, data position and RNG stay fresh). Every parameter must be there:
        the missing ones are named on every rank before any tensor is read."""
        params = dict(named_parameters(self.chunks))
        stored = read_dcp_metadata(resolve(path)).state_dict_metadata
        missing = [name for name in params if f"model.{name}" not in stored]
        every_rank = [missing]
        if self.parallel.world_size > 1:
            every_rank = [None] * self.parallel.world_size
            dist.all_gather_object(every_rank, missing)
        missing = sorted({name for names in every_rank for name in names})
        if missing:
            raise CheckpointMismatchError(
                f"checkpoint {resolve(path)} lacks model parameters this run has "
                f"({len(missing)}): {', '.join(missing[:10])}; the model config (stem.layers, "
                f"model.*) must match the checkpoint's",
                missing=missing,
            )
        dense = self._dense()
        Checkpointer(resolve(path).parent).load(
            path, {"model": self._model(dense, saving=False)}, strict=False
        )
        dense.loaded()
        self.tables.rows_replaced()
