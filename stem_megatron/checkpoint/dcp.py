"""The Checkpointer: sharded DCP saves committed atomically, loads checked before reading.

Usage by the trainer (every rank calls both):

    ckpt = Checkpointer(run_dir / "checkpoints")
    ckpt.save(step, state, metadata)           # -> checkpoints/step_<step>
    metadata = ckpt.load(path, state)          # fills `state` in place

`state` is a nested dict; tensor leaves go through DCP (sharded, reshardable: DTensor
and ShardedTensor leaves keep their global offsets), every other leaf must be a JSON
scalar and goes to `scalars.json` (see flatten.py). For model + dense optimizer, use
torch.distributed.checkpoint.state_dict.get_state_dict / set_state_dict: they key the
optimizer by parameter FQN and create its lazy state, so a fresh optimizer has every
key the checkpoint holds. Keys that differ per rank (e.g. RNG states) must carry the
rank in their name; keys present on several ranks are saved once (DCP deduplicates)
and must hold the same values.
"""

import contextlib
import json
import logging
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from stem_megatron.checkpoint import layout
from stem_megatron.checkpoint.compare import check_rank, merge_reports
from stem_megatron.checkpoint.errors import CheckpointExistsError, CheckpointSaveError
from stem_megatron.checkpoint.flatten import Scalar, flatten_state, restore_scalars
from stem_megatron.checkpoint.layout import resolve
from stem_megatron.checkpoint.manifest import MANIFEST_JSON, digest_file, manifest_text
from stem_megatron.checkpoint.recovery import recover_strays
from stem_megatron.checkpoint.safe_io import (
    SafeFileSystemReader,
    TensorOnlyLoadPlanner,
    read_dcp_metadata,
)
from stem_megatron.checkpoint.space import checkpoint_nbytes, human, space_problem, tensor_nbytes
from stem_megatron.writable import unwritable_reason

logger = logging.getLogger(__name__)

__all__ = ["Checkpointer", "resolve"]


class _Ranks:
    """This rank within the checkpoint's process group; plain identity without torch.distributed."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.size = dist.get_world_size(group) if self.distributed else 1

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_from_first(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def on_first(self, action: Callable[[], Any]) -> Any:
        """`action()` on rank 0 alone; every rank returns its result, or raises its error."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = action()
            except Exception as e:
                error = e
        error, result = self.broadcast_from_first((_portable(error), result))
        if error is not None:
            raise error
        return result

    def raise_any(self, errors: list[BaseException | None]) -> None:
        """Raise on every rank if any rank failed, so none is left waiting in a collective."""
        local = errors[self.rank]
        if local is not None:
            raise local
        for rank, error in enumerate(errors):
            if error is not None:
                error.add_note(f"(raised on rank {rank} of the checkpoint group)")
                raise error


def _portable(error: BaseException | None) -> BaseException | None:
    # Errors cross ranks by pickle; one that cannot travel is sent as its text.
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _merge_scalars(per_rank: list[dict[str, Scalar]]) -> dict[str, Scalar]:
    merged: dict[str, Scalar] = {}
    for rank, scalars in enumerate(per_rank):
        for key, value in scalars.items():
            # Compare JSON text, not values: NaN != NaN but is the same saved value.
            if key in merged and json.dumps(merged[key]) != json.dumps(value):
                raise ValueError(
                    f"state key {key!r} holds {merged[key]!r} on an earlier rank and {value!r} "
                    f"on rank {rank}; per-rank values need per-rank keys"
                )
            merged[key] = value
    return merged


@contextlib.contextmanager
def calling_dcp() -> Iterator[None]:
    """Call DCP quietly, surfacing the failing rank's own error.

    DCP warns that it assumes a single process when torch.distributed is not
    initialised; that is exactly our intent on a laptop run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as e:
            # DCP wraps every rank's failure in a BaseException that `except Exception`
            # misses; surface the lowest failing rank's own error, with DCP's report chained.
            rank = min(e.failures)
            raise e.failures[rank][0] from e


def _sizes(tensors: dict[str, Any]) -> dict[str, int]:
    return {key: tensor_nbytes(t) for key, t in tensors.items()}


class Checkpointer:
    """Saves and loads one run's checkpoints under `checkpoint_dir` (`<run>/checkpoints`).

    Every rank of `process_group` (default: the world) must call save and load together.
    """

    def __init__(
        self, checkpoint_dir: str | os.PathLike, process_group: dist.ProcessGroup | None = None
    ) -> None:
        self.dir = Path(checkpoint_dir)
        self.process_group = process_group

    def latest(self) -> Path | None:
        """The checkpoint `latest` points to, or None if this run has not saved yet."""
        return layout.latest_checkpoint(self.dir)

    def save(self, step: int, state: dict[str, Any], metadata: dict[str, Any]) -> Path:
        """Write `state` and `metadata` as `step_<step>/`, then point `latest` at it.

        Refuses (CheckpointExistsError) if `step_<step>` exists, and (CheckpointSaveError)
        if the disk lacks room for it; a write that fails (disk full, I/O error) removes its
        tmp dir and raises CheckpointSaveError. A crash at any point leaves earlier
        checkpoints and `latest` as they were; its tmp dir is removed by the next successful
        save. The commit adds manifest.json (sizes and CRC-32s, manifest.py). `metadata` is
        written from rank 0; every rank still checks that its own is JSON-serialisable so
        all fail alike.
        """
        ranks = _Ranks(self.process_group)
        final = self.dir / layout.step_dir_name(step)
        error: BaseException | None = None
        tensors: dict[str, Any] = {}
        scalars: dict[str, Scalar] = {}
        metadata_text = ""
        try:
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"step must be a non-negative int, got {step!r}")
            tensors, scalars = flatten_state(state)
            metadata_text = json.dumps(metadata, indent=2)
        except Exception as e:
            error = e
        gathered = ranks.all_gather((_portable(error), scalars, _sizes(tensors)))
        ranks.raise_any([g[0] for g in gathered])
        merged_scalars = _merge_scalars([g[1] for g in gathered])
        need = checkpoint_nbytes(
            {k: n for g in gathered for k, n in g[2].items()}, len(metadata_text)
        )

        def claim_tmp_dir() -> str:
            if final.exists():
                raise CheckpointExistsError(
                    f"checkpoint {final} already exists; refusing to overwrite it"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
            problem = space_problem(self.dir, need)
            if problem:
                raise CheckpointSaveError(
                    f"not saving {final.name}: {problem}; free space "
                    f"there (or save elsewhere with checkpoint.save)"
                )
            return layout.tmp_dir_name(step)

        tmp = self.dir / ranks.on_first(claim_tmp_dir)
        try:
            self._write(ranks, tmp, final, tensors, merged_scalars, metadata_text)
        except BaseException as e:
            if (
                ranks.rank == 0
            ):  # every rank is past DCP's collective write: nothing writes here now
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (OSError, RuntimeError)) and not isinstance(
                e, (CheckpointExistsError, CheckpointSaveError)
            ):
                reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]  # one line
                raise CheckpointSaveError(
                    f"saving {final} failed ({reason}); removed the partial save; "
                    f"{self.dir} has {human(shutil.disk_usage(self.dir).free)} free, the "
                    f"checkpoint needs about {human(need)}"
                ) from e
            raise
        if ranks.rank == 0:
            self._remove_stale_tmp()
        return final

    def _write(
        self,
        ranks: _Ranks,
        tmp: Path,
        final: Path,
        tensors: dict[str, Any],
        scalars: dict[str, Scalar],
        metadata_text: str,
    ) -> None:
        """DCP's shards into `tmp`, each rank checksumming a share of the files, then rank 0
        adds the JSON files and the manifest and commits `tmp` as `final`."""
        with calling_dcp():
            dcp.save(
                tensors,
                storage_writer=FileSystemWriter(tmp, sync_files=True),
                process_group=self.process_group,
            )
        # DCP has returned on every rank, so every shard is on disk before the commit.
        ranks.barrier()
        error: BaseException | None = None
        digests: dict[str, Any] = {}
        try:
            names = sorted(os.listdir(tmp))
            digests = {name: digest_file(tmp / name) for name in names[ranks.rank :: ranks.size]}
        except Exception as e:
            error = e
        gathered = ranks.all_gather((_portable(error), digests))
        ranks.raise_any([g[0] for g in gathered])

        def add_json_files_and_commit() -> None:
            files = {name: d for g in gathered for name, d in g[1].items()}
            for name, text in (
                (layout.SCALARS_JSON, json.dumps(scalars, indent=1)),
                (layout.METADATA_JSON, metadata_text),
            ):
                layout.write_durable(tmp / name, text)
                files[name] = digest_file(tmp / name)
            layout.write_durable(tmp / MANIFEST_JSON, manifest_text(files))
            layout.commit(tmp, final)

        ranks.on_first(add_json_files_and_commit)

    def check_can_save(self, state: dict[str, Any], steps: list[int]) -> None:
        """Before a run trains: the checkpoint dir is writable, holds none of `steps` yet,
        and has room for one checkpoint of `state`. Raises CheckpointSaveError or
        CheckpointExistsError on every rank."""
        ranks = _Ranks(self.process_group)
        tensors, _ = flatten_state(state)
        gathered = ranks.all_gather(_sizes(tensors))
        need = checkpoint_nbytes({k: n for sizes in gathered for k, n in sizes.items()})
        ranks.on_first(lambda: self._check_dir(steps, need))

    def _check_dir(self, steps: list[int], need: int) -> None:
        reason = unwritable_reason(self.dir)
        if reason:
            raise CheckpointSaveError(
                f"checkpoints cannot be saved to {self.dir}: {reason}; "
                f"set checkpoint.save (or logging.run_dir) to a writable "
                f"directory"
            )
        taken = [
            self.dir / layout.step_dir_name(s)
            for s in steps
            if (self.dir / layout.step_dir_name(s)).exists()
        ]
        if taken:
            raise CheckpointExistsError(
                f"{taken[0]} already exists, and this run would save that step: resume from "
                f"the newest checkpoint with checkpoint.load=auto, or move it away, or save "
                f"elsewhere with checkpoint.save"
            )
        problem = space_problem(self.dir, need)
        if problem:
            raise CheckpointSaveError(
                f"{problem}; free space there (or save elsewhere with checkpoint.save)"
            )

    def recover_strays(self) -> list[str]:
        """Adopt or set aside step dirs newer than `latest` (recovery.py); the lines to print.
        Rank 0 acts, every rank gets the lines (or the error)."""
        return _Ranks(self.process_group).on_first(lambda: recover_strays(self.dir))

    def load(
        self, path: str | os.PathLike, state: dict[str, Any], strict: bool = True
    ) -> dict[str, Any]:
        """Load the checkpoint at `path` (see resolve) into `state` in place; return its metadata.

        Tensors are copied into the state's tensors (on whatever device they live);
        scalar leaves are replaced in their containers. Before any tensor data is read,
        keys and shapes are compared: CheckpointMismatchError names the first tensor
        whose shape differs (both shapes), wrongly typed entries, and, if `strict`,
        keys missing from the checkpoint or present in it but expected by no rank.
        With strict=False those keys are skipped (e.g. loading model weights only).
        """
        ranks = _Ranks(self.process_group)
        error: BaseException | None = None
        report = None
        try:
            ckpt = resolve(path)
            tensors, scalars = flatten_state(state)
            dcp_metadata = read_dcp_metadata(ckpt)
            stored_scalars = layout.read_json(ckpt, layout.SCALARS_JSON)
            metadata = layout.read_json(ckpt, layout.METADATA_JSON)
            report = check_rank(ranks.rank, tensors, scalars, dcp_metadata, stored_scalars)
        except Exception as e:
            error = e
        gathered = ranks.all_gather((_portable(error), report))
        ranks.raise_any([g[0] for g in gathered])
        checkpoint_keys = set(dcp_metadata.state_dict_metadata) | set(stored_scalars)
        mismatch = merge_reports([g[1] for g in gathered], checkpoint_keys, strict, str(ckpt))
        if mismatch is not None:
            raise mismatch

        present = {key: t for key, t in tensors.items() if key in dcp_metadata.state_dict_metadata}
        with calling_dcp():
            dcp.load(
                present,
                storage_reader=SafeFileSystemReader(ckpt),
                planner=TensorOnlyLoadPlanner(),
                process_group=self.process_group,
            )
        restore_scalars(
            state, {key: stored_scalars[key] for key in scalars if key in stored_scalars}
        )
        return metadata

    def _remove_stale_tmp(self) -> None:
        # Best effort: the checkpoint is already committed, so a leftover must not fail the save.
        try:
            removed = layout.remove_stale_tmp(self.dir)
        except OSError as e:
            logger.warning("could not remove stale checkpoint tmp dirs in %s: %s", self.dir, e)
            return
        if removed:
            logger.info(
                "removed stale checkpoint tmp entries: %s", ", ".join(p.name for p in removed)
            )
