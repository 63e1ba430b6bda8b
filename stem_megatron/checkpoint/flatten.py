"""Flatten a nested training state into dotted keys, and write loaded values back.

A state is a dict of dicts/lists/tuples whose leaves are tensors or JSON scalars
(None, bool, int, float, str): model and optimizer state_dicts, sparse-optimizer
counters, RNG states. Tensors go to DCP under their dotted key; scalars go to JSON.
Keeping scalars out of DCP keeps pickle out of the load path (see safe_io.py).

Keys are joined with "." so they read like Megatron/DCP FQNs
("model.decoder.layers.0.mlp.linear_fc1.weight", "optim.state.0.exp_avg").
The string form is only used to match saved leaves to the caller's structure, so
int dict keys and list indices are written as their decimal string; two paths
that would produce the same string are rejected rather than silently merged.
"""

from collections.abc import Iterator
from typing import Any

import torch

Scalar = None | bool | int | float | str
_SCALAR_TYPES = (type(None), bool, int, float, str)


def _children(node: Any) -> Iterator[tuple[Any, str, Any]]:
    """(slot, name, value) for each child: slot indexes the container, name is its key part."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"state dict keys must be str or int, got {key!r}")
            yield key, str(key), value
    else:
        for index, value in enumerate(node):
            yield index, str(index), value


def flatten_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Scalar]]:
    """Split `state` into (dotted key -> tensor, dotted key -> JSON scalar), in traversal order."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Scalar] = {}

    def visit(node: Any, prefix: str) -> None:
        for _, name, value in _children(node):
            key = f"{prefix}.{name}" if prefix else name
            if isinstance(value, (dict, list, tuple)):
                visit(value, key)
                continue
            if key in tensors or key in scalars:
                raise ValueError(f"two entries of the state flatten to the same key {key!r}")
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif isinstance(value, _SCALAR_TYPES):
                scalars[key] = value
            else:
                raise TypeError(
                    f"state entry {key!r} is a {type(value).__name__}; leaves must be tensors "
                    "or JSON scalars (None, bool, int, float, str)"
                )

    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    visit(state, "")
    return tensors, scalars


def restore_scalars(state: dict[str, Any], scalars: dict[str, Scalar]) -> None:
    """Write `scalars` into the matching leaves of `state` in place.

    Tuples are immutable, so a tuple on the path is rebuilt and re-assigned into its
    parent; dicts and lists are updated in place so callers' references stay valid.
    Keys absent from `scalars` keep their current value.
    """

    def rebuild(node: Any, prefix: str) -> Any:
        target = list(node) if isinstance(node, tuple) else node
        for slot, name, value in list(_children(node)):
            key = f"{prefix}.{name}" if prefix else name
            if isinstance(value, (dict, list, tuple)):
                new = rebuild(value, key)
                if new is not value:
                    target[slot] = new
            elif key in scalars:
                target[slot] = scalars[key]
        return tuple(target) if isinstance(node, tuple) else node

    rebuild(state, "")
