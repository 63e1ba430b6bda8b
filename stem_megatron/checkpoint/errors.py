"""Errors the checkpointer raises, one per way a checkpoint can be wrong."""


class CheckpointNotFoundError(FileNotFoundError):
    """A path does not lead to a complete checkpoint (missing path, pointer or files)."""


class CheckpointCorruptError(CheckpointNotFoundError):
    """A checkpoint's files are there but not as saved (truncated, overwritten, unparsable).

    A CheckpointNotFoundError, so every entry point that reports a missing checkpoint in one
    line reports a damaged one too; the message names the file."""


class CheckpointSaveError(OSError):
    """A checkpoint cannot be written: its directory is unwritable, the disk lacks space for
    it, or the write failed (the partial save is removed)."""


class CheckpointExistsError(FileExistsError):
    """A save would overwrite an existing `step_N` checkpoint."""


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or tensor shapes do not match the state being loaded into.

    `key`, `checkpoint_shape`, `expected_shape` describe the first mismatched tensor
    (None if all shapes match); `missing` and `unexpected` list key differences.
    """

    def __init__(
        self,
        message: str,
        key: str | None = None,
        checkpoint_shape: tuple[int, ...] | None = None,
        expected_shape: tuple[int, ...] | None = None,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.key = key
        self.checkpoint_shape = checkpoint_shape
        self.expected_shape = expected_shape
        self.missing = missing or []
        self.unexpected = unexpected or []


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint asks for something that would need unrestricted unpickling."""
