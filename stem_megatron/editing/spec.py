"""Edits as written on the command line (`--swap "Spain=Germany"`), parsed and checked
without torch, so tools/edit_knowledge.py rejects a bad edit before its slow imports."""

from __future__ import annotations

from dataclasses import dataclass

from stem_megatron.editing.entities import EditError

# How each operation is written on the command line.
SYNTAX = {
    "swap": "A=B",
    "copy": "A=B (A takes B's rows)",
    "average": "A+B[+C...]",
    "inject": "A=B+C[+...] (A takes the mean of B, C, ...)",
}
OPERATIONS = tuple(SYNTAX)


@dataclass(frozen=True)
class EditSpec:
    operation: str
    entities: tuple[str, ...]

    @classmethod
    def parse(cls, operation: str, text: str) -> EditSpec:
        if operation not in OPERATIONS:
            raise EditError(f"unknown edit {operation!r}; choose one of {', '.join(OPERATIONS)}")
        if operation == "average":
            parts = text.split("+")
        else:
            dest, sep, rest = text.partition("=")
            parts = [dest] + (rest.split("+") if operation == "inject" else [rest])
            if not sep:
                parts = []
        if len(parts) < 2 or not all(parts) or (operation in ("swap", "copy") and "+" in text):
            raise EditError(f"--{operation} {text!r}: expected {SYNTAX[operation]}")
        if len({part.strip() for part in parts}) == 1:  # A=A, A+A, A=A+A: rows stay as they are
            raise EditError(
                f"--{operation} {text!r} names {parts[0].strip()!r} on every side, "
                "so it would change nothing: name two different entities"
            )
        return cls(operation, tuple(parts))

    def __str__(self) -> str:
        return f"{self.operation} {' | '.join(self.entities)}"
