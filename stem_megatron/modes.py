"""The run's modes: each config key that picks one of a few behaviours is an enum here.

The config loader converts and checks them (an unknown value is an error naming the key and
the choices), and code compares members, never string literals. String-valued, so a config,
a checkpoint's metadata and the command line spell them as before.
"""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """A mode: its value is what configs spell."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def choices(cls) -> str:
        return ", ".join(repr(m.value) for m in cls)


class TableStorage(Mode):
    """`stem.storage`: where the STEM tables and their optimizer state live."""

    DEVICE = "device"  # tensors on the compute device
    HOST = "host"  # host memory; each micro-batch's rows are staged on the device
    MMAP = "mmap"  # as host, in memory-mapped files (tables larger than RAM)

    @property
    def off_device(self) -> bool:
        return self is not TableStorage.DEVICE


class TableLayout(Mode):
    """`stem.dp_layout`: how data-parallel ranks hold the tables."""

    REPLICATED = "replicated"  # every rank holds every row; row gradients all-reduced
    VOCAB_SHARDED = "vocab_sharded"  # each rank owns a block of rows and their state


class TableOptimizerMode(Mode):
    """`stem.optimizer.mode`: lazy moves only rows with a gradient (SparseAdam's rule); exact
    replays the idle steps of a row before it is read, as dense AdamW would have."""

    LAZY = "lazy"
    EXACT = "exact"


class DecayStyle(Mode):
    """`optim.lr_decay_style` (Megatron's values that we support)."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class RecomputeGranularity(Mode):
    """`model.recompute_granularity` (Megatron's); unset: no recomputation."""

    FULL = "full"  # whole layers, chosen by recompute_method and recompute_num_layers
    SELECTIVE = "selective"  # the attention core


class RecomputeMethod(Mode):
    """`model.recompute_method` (full recomputation only)."""

    UNIFORM = "uniform"
    BLOCK = "block"


class RopeScalingType(Mode):
    """`model.rope_scaling.type` (model/rope.py)."""

    NONE = "none"
    LLAMA3 = "llama3"
