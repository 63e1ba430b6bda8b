"""A damaged checkpoint is one CheckpointCorruptError naming the file, from every reader.

The damage a copy or a disk can do: a file truncated to half, 4 KB overwritten with random
bytes, random bytes in DCP's `.metadata`, a truncated metadata.json. Each reader (the
training Checkpointer and the single-process OfflineCheckpoint the tools use) must refuse
it before any tensor is used. CheckpointCorruptError is a CheckpointNotFoundError, which
every entry point reports as one `error:` line. Checkpoints saved before manifest.json
existed still load; their damage is caught where the bytes fail to parse.
"""

from pathlib import Path

import pytest
import torch

from stem_megatron.checkpoint.dcp import Checkpointer
from stem_megatron.checkpoint.errors import CheckpointCorruptError
from stem_megatron.checkpoint.manifest import MANIFEST_JSON
from stem_megatron.checkpoint.offline import OfflineCheckpoint

SHARD = "__0_0.distcp"


def _saved(tmp_path: Path, manifest: bool = True) -> Path:
    final = Checkpointer(tmp_path / "checkpoints").save(
        4, {"w": torch.arange(8192.0), "b": torch.ones(16)}, {"step": 4}
    )
    if not manifest:  # as saved before manifests existed
        (final / MANIFEST_JSON).unlink()
    return final


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scribble(path: Path, offset: int, size: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(
            torch.randint(
                0, 256, (size,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
            )
            .numpy()
            .tobytes()
        )


def _load(final: Path) -> None:
    Checkpointer(final.parent).load(final, {"w": torch.zeros(8192), "b": torch.zeros(16)})


def _read_offline(final: Path) -> None:
    ckpt = OfflineCheckpoint(final)
    for key in ckpt.keys():
        ckpt.read(key)


READERS = [_load, _read_offline]


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("read", READERS)
def test_truncated_shard(tmp_path: Path, read, manifest: bool) -> None:
    final = _saved(tmp_path, manifest)
    _truncate(final / SHARD)
    with pytest.raises(
        CheckpointCorruptError, match=f"{final} is damaged: {SHARD} .*copy the checkpoint again"
    ):
        read(final)


@pytest.mark.parametrize("read", READERS)
def test_overwritten_bytes_fail_the_checksum(tmp_path: Path, read) -> None:
    final = _saved(tmp_path)
    _scribble(final / SHARD, 4096, 4096)  # same size: only the checksum can tell
    with pytest.raises(CheckpointCorruptError, match=f"{SHARD} does not match its checksum"):
        read(final)


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("read", READERS)
def test_random_dcp_metadata(tmp_path: Path, read, manifest: bool) -> None:
    final = _saved(tmp_path, manifest)
    meta = final / ".metadata"
    _scribble(meta, 0, meta.stat().st_size)
    with pytest.raises(CheckpointCorruptError, match=r"is damaged: \.metadata "):
        read(final)


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("read", READERS)
def test_truncated_metadata_json(tmp_path: Path, read, manifest: bool) -> None:
    final = _saved(tmp_path, manifest)
    _truncate(final / "metadata.json")
    with pytest.raises(CheckpointCorruptError, match=r"is damaged: metadata\.json "):
        read(final)


@pytest.mark.parametrize("read", READERS)
def test_damaged_manifest(tmp_path: Path, read) -> None:
    final = _saved(tmp_path)
    _truncate(final / MANIFEST_JSON)
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json is unreadable"):
        read(final)


def test_intact_checkpoints_load_with_and_without_manifest(tmp_path: Path) -> None:
    for manifest in (True, False):
        final = _saved(tmp_path / str(manifest), manifest)
        state = {"w": torch.zeros(8192), "b": torch.zeros(16)}
        assert Checkpointer(final.parent).load(final, state) == {"step": 4}
        assert torch.equal(state["w"], torch.arange(8192.0))
        assert torch.equal(OfflineCheckpoint(final).read("b"), torch.ones(16))
