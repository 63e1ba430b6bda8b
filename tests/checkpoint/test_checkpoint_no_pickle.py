"""A checkpoint carrying a malicious pickle cannot run code through our load path.

Each hazard is first shown to be real with stock DCP (the payload does run), then
shown not to run through Checkpointer.load.
"""

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.checkpoint.errors import CheckpointMismatchError, UnsafeCheckpointError
from stem_megatron.checkpoint.safe_io import SafeFileSystemReader, TensorOnlyLoadPlanner

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Payload:
    """Unpickling this writes `marker`: stands in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _finish_as_checkpoint(step_dir: Path) -> None:
    (step_dir / "scalars.json").write_text("{}")
    (step_dir / "metadata.json").write_text(json.dumps({"step": 1}))


@pytest.fixture
def bytes_item_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A DCP checkpoint whose non-tensor item 'x' is pickled bytes holding the payload."""
    marker = tmp_path / "marker"
    step_dir = tmp_path / "checkpoints" / "step_1"
    dcp.save({"w": torch.ones(2), "x": Payload(marker)}, checkpoint_id=step_dir)
    _finish_as_checkpoint(step_dir)
    assert not marker.exists()
    return step_dir, marker


def test_stock_dcp_runs_the_bytes_payload(bytes_item_checkpoint: tuple[Path, Path]) -> None:
    step_dir, marker = bytes_item_checkpoint
    dcp.load({"w": torch.zeros(2), "x": None}, checkpoint_id=step_dir)
    assert marker.read_text() == "pwned"  # DefaultLoadPlanner.load_bytes: weights_only=False


@pytest.mark.parametrize(
    "state",
    [
        {"w": torch.zeros(2), "x": torch.zeros(1)},
        {"w": torch.zeros(2), "x": 0},
        {"w": torch.zeros(2)},
    ],
    ids=["as-tensor", "as-scalar", "not-requested"],
)
def test_checkpointer_never_unpickles_bytes_items(
    bytes_item_checkpoint: tuple[Path, Path], state: dict
) -> None:
    step_dir, marker = bytes_item_checkpoint
    with pytest.raises(CheckpointMismatchError, match="'x'"):
        Checkpointer(step_dir.parent).load(step_dir, state)
    assert not marker.exists()


def test_partial_load_skips_bytes_items(bytes_item_checkpoint: tuple[Path, Path]) -> None:
    step_dir, marker = bytes_item_checkpoint
    state = {"w": torch.zeros(2)}
    Checkpointer(step_dir.parent).load(step_dir, state, strict=False)
    assert torch.equal(state["w"], torch.ones(2))
    assert not marker.exists()


def test_planner_refuses_bytes_even_if_asked(bytes_item_checkpoint: tuple[Path, Path]) -> None:
    # Defence in depth: our reader + planner with DCP driving, bypassing the pre-check.
    step_dir, marker = bytes_item_checkpoint
    with pytest.raises(CheckpointException) as info:
        dcp.load(
            {"x": None},
            storage_reader=SafeFileSystemReader(step_dir),
            planner=TensorOnlyLoadPlanner(),
        )
    error, _ = info.value.failures[0]
    assert isinstance(error, UnsafeCheckpointError) and "'x' as pickled bytes" in str(error)
    assert not marker.exists()


def test_malicious_metadata_file_is_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    step_dir = tmp_path / "checkpoints" / "step_1"
    step_dir.mkdir(parents=True)
    (step_dir / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _finish_as_checkpoint(step_dir)

    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        Checkpointer(step_dir.parent).load(step_dir, {"w": torch.zeros(2)})
    assert not marker.exists()

    # The stock reader: pickle.load runs the payload, whose result (None) then has no
    # storage_meta.
    with pytest.raises(AttributeError):
        FileSystemReader(step_dir).read_metadata()
    assert marker.read_text() == "pwned"


def test_payload_nested_inside_real_metadata_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    step_dir = tmp_path / "checkpoints" / "step_1"
    dcp.save({"w": torch.ones(2)}, checkpoint_id=step_dir)
    _finish_as_checkpoint(step_dir)
    metadata = FileSystemReader(step_dir).read_metadata()
    metadata.planner_data = {"w": Payload(marker)}
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))

    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        Checkpointer(step_dir.parent).load(step_dir, {"w": torch.zeros(2)})
    assert not marker.exists()
