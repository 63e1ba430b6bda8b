"""The files the repository bundles (configs/*.yaml, the corpus prepared under data/prepared/)
are named by repository-relative paths, in the docs, the configs and every run's recorded
config. Given from another working directory, such a path names the repository's file, so the
commands work from anywhere; a file of that name in the working directory still comes first."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def from_repo_root(path: str, probe_suffix: str = "") -> str:
    """`path` itself when it is absolute or exists here (as `path + probe_suffix`: a dataset
    prefix exists through its .idx), else the repository's file of that relative name if that
    one exists, else `path` unchanged (its error then names what the user gave)."""
    if Path(path).is_absolute() or Path(path + probe_suffix).exists():
        return path
    candidate = REPO_ROOT / path
    return str(candidate) if Path(f"{candidate}{probe_suffix}").exists() else path


def data_from_repo_root(data: Any) -> Any:
    """A DataConfig with its tokenizer and dataset prefixes resolved by from_repo_root."""
    valid = data.valid_data
    return dataclasses.replace(
        data,
        tokenizer=from_repo_root(data.tokenizer),
        train_data=from_repo_root(data.train_data, ".idx"),
        valid_data=from_repo_root(valid, ".idx") if valid is not None else None,
    )
