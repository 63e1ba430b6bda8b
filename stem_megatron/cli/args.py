"""What every command line shares: argument types that reject out-of-range numbers while
parsing, and a help formatter that shows defaults.

Imports only the standard library: the tools parse their arguments before importing torch,
so `--help` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, unless it has no default worth showing
    (None, False, []) or its help already says what happens by default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _ranged(kind: type, ok: Callable[[float], bool], allowed: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


positive_int = _ranged(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _ranged(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = _ranged(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
fraction = _ranged(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def int_list(text: str) -> list[int]:
    """Comma-separated integers such as layer numbers: "1,3"."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 1,3, got {text!r}"
        ) from None
