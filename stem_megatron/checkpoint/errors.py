"""Errors the checkpointer raises, one per way a checkpoint can be wrong."""


class CheckpointNotFoundError(FileNotFoundError):
    """A path does not lead to a complete checkpoint (missing path, pointer or files)."""


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
