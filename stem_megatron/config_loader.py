"""Loading a run configuration: YAML plus dotted `section.key=value` command-line overrides
into the dataclasses of config.py, every value type-checked (an unknown key or a wrong type is
an error that names the key and what is allowed), then the checks of config_validation.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from stem_megatron.atomic_file import write_text_atomically
from stem_megatron.config import ConfigError, RunConfig, plain_dict
from stem_megatron.config_validation import validate
from stem_megatron.modes import Mode
from stem_megatron.repo_paths import data_from_repo_root, from_repo_root


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:  # Optional[X]: X's own message is the precise one
            return _check_value(key, value, non_none[0])
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if isinstance(tp, type) and issubclass(tp, Mode):
        if value not in {m.value for m in tp}:
            raise ConfigError(f"{key} must be one of {tp.choices()}, got {value!r}")
        return tp(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):  # .nan passes every range check below
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'; allowed in "
            f"'{prefix.rstrip('.') or 'the top level'}': {', '.join(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, tp)
    return cls(**kwargs)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form section.key=value")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override '{override}': value is not valid YAML "
            f"({_yaml_problem(exc)}); quote strings, close brackets, e.g. "
            f"stem.layers=[1,3]"
        ) from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The YAML parser's several-line report as one phrase: the problem and where."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _dataclass_tree(cls: type) -> dict[str, Any]:
    """Default values of `cls` as a nested dict, so overrides can be merged into it."""
    return plain_dict(cls())


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (defaults when None), apply `section.key=value` overrides, validate."""
    tree: dict[str, Any] = {}
    name = "run"
    if path is not None:
        path = Path(from_repo_root(str(path)))  # configs/tiny.yaml from any directory
        if path.is_dir():
            raise ConfigError(
                f"--config '{path}' is a directory: name a YAML file in it, e.g. configs/tiny.yaml"
            )
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"config file '{path}' is not valid YAML: {_yaml_problem(exc)}"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file '{path}' cannot be read as UTF-8 text: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
        tree = loaded
        name = path.stem
    tree.setdefault("name", name)
    return config_from_dict(tree, overrides or [])


def config_from_dict(
    tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """A validated config from a config tree (a YAML file's, or the resolved one a checkpoint
    records), with `section.key=value` overrides applied; missing fields take their defaults.
    `tree` itself is not modified."""
    tree = copy.deepcopy(tree)
    for override in overrides:
        _apply_override(tree, override)
    config = _build(RunConfig, _merge(_dataclass_tree(RunConfig), tree), "")
    config.data = data_from_repo_root(config.data)  # the bundled corpus from any directory
    validate(config)
    return config


def save_config(config: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
