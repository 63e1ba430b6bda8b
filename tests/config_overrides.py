"""Config trees as dotted overrides, for tests that hand a whole config to worker processes."""

from __future__ import annotations

import json


def as_overrides(tree: dict, prefix: str = "") -> list[str]:
    """A config dict as `section.key=value` overrides (JSON values are YAML)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out
