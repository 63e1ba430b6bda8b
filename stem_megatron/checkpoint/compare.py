"""Compare the state a caller wants to load into against what a checkpoint holds.

Runs on DCP metadata and the JSON scalars only, before any tensor bytes are read,
so a wrong model size fails in milliseconds with the tensor named instead of deep
inside DCP. Under several ranks each rank checks its own keys; `unexpected` needs
the union of every rank's keys, so reports are gathered and merged (merge_reports).
"""

from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from stem_megatron.checkpoint.errors import CheckpointMismatchError
from stem_megatron.checkpoint.flatten import Scalar


@dataclass
class RankReport:
    """One rank's view: its expected keys and what did not match."""

    rank: int
    expected_keys: set[str]
    # (key, checkpoint shape, expected shape) of the first tensor whose shape differs.
    first_shape_mismatch: tuple[str, tuple[int, ...], tuple[int, ...]] | None = None
    # Keys stored as something other than what the caller expects (tensor vs scalar vs bytes).
    wrong_kind: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def check_rank(
    rank: int,
    tensors: dict[str, torch.Tensor],
    scalars: dict[str, Scalar],
    metadata: Metadata,
    stored_scalars: dict[str, Scalar],
) -> RankReport:
    stored = metadata.state_dict_metadata
    report = RankReport(rank=rank, expected_keys=set(tensors) | set(scalars))
    for key, tensor in tensors.items():
        if key in stored:
            entry = stored[key]
            if not isinstance(entry, TensorStorageMetadata):
                report.wrong_kind.append(f"{key!r} is stored as pickled bytes, expected a tensor")
                continue
            # .shape is the global shape for DTensor/ShardedTensor, as in DCP metadata.
            have, want = tuple(entry.size), tuple(tensor.shape)
            if have != want and report.first_shape_mismatch is None:
                report.first_shape_mismatch = (key, have, want)
        elif key in stored_scalars:
            report.wrong_kind.append(f"{key!r} is a scalar in the checkpoint, expected a tensor")
        else:
            report.missing.append(key)
    for key in scalars:
        if key in stored:
            kind = "a tensor" if isinstance(stored[key], TensorStorageMetadata) else "pickled bytes"
            report.wrong_kind.append(f"{key!r} is stored as {kind}, expected a JSON scalar")
        elif key not in stored_scalars:
            report.missing.append(key)
    return report


def merge_reports(
    reports: list[RankReport],
    checkpoint_keys: set[str],
    strict: bool,
    where: str,
) -> CheckpointMismatchError | None:
    """One error describing every rank's problems, or None if the load may proceed.

    With strict=False missing and unexpected keys are tolerated (partial loads, e.g.
    model weights only); shape and kind mismatches never are.
    """
    first = next((r for r in reports if r.first_shape_mismatch is not None), None)
    wrong_kind = [f"rank {r.rank}: {msg}" for r in reports for msg in r.wrong_kind]
    missing = sorted({key for r in reports for key in r.missing}) if strict else []
    expected = set().union(*(r.expected_keys for r in reports))
    unexpected = sorted(checkpoint_keys - expected) if strict else []
    if first is None and not wrong_kind and not missing and not unexpected:
        return None

    lines = [f"checkpoint {where} does not match the state being loaded:"]
    key = have = want = None
    if first is not None:
        key, have, want = first.first_shape_mismatch  # type: ignore[misc]
        lines.append(
            f"  shape mismatch for {key!r} (rank {first.rank}): "
            f"checkpoint has {list(have)}, expected {list(want)}"
        )
    lines += [f"  {msg}" for msg in wrong_kind]
    if missing:
        lines.append(f"  missing from checkpoint ({len(missing)}): {_preview(missing)}")
    if unexpected:
        lines.append(f"  unexpected in checkpoint ({len(unexpected)}): {_preview(unexpected)}")
    return CheckpointMismatchError(
        "\n".join(lines),
        key=key,
        checkpoint_shape=have,
        expected_shape=want,
        missing=missing,
        unexpected=unexpected,
    )


def _preview(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys) - limit} more)"
