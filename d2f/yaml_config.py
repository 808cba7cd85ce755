"""Typed experiment configs: dataclasses <- one YAML file <- `key=value` overrides.

    cfg = load_config(DistillConfig, "configs/d2f_tiny.yaml", ["max_steps=10", "lora.r=8"])

Values are converted to the field's declared type (int, float, bool, str, lists, nested
dataclasses, Optional[...]); unknown keys are errors that name the key and suggest the
closest valid one. `save_config` writes the resolved config (saved beside every checkpoint).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from d2f.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A bad config file, key or value."""


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}.{hint} Valid keys: {', '.join(sorted(valid))}")


def parse_bool(value: Any, what: str) -> bool:
    """A true/false setting given as a bool or a string (true/false, 1/0, yes/no, on/off); `what` names it in
    the error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise ConfigError(f"{what}: expected true/false, got {value!r}")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for a in args:
            try:
                return _convert(value, a, key)
            except (ConfigError, ValueError, TypeError):
                continue
        raise ConfigError(f"config key {key!r}: cannot convert {value!r} to {tp}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} is a section; expected a mapping, got {value!r}")
        return from_dict(tp, value, where=key)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        out = [_convert(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        return parse_bool(value, f"config key {key!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int and isinstance(value, str):
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key {key!r}: expected {tp.__name__}, got {value!r}") from None
        if not math.isfinite(out):  # no setting of ours means anything at nan or +-inf
            raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (possibly nested) dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in fields:
            raise _unknown(key, list(fields), where)
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where != "config" else key)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": "1"}, "c": "x"} (values stay strings; typed later)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key inside a non-section value")
        node[parts[-1]] = value
    return out


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Dataclass defaults <- YAML file <- key=value overrides, typed and validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory; pass a YAML file (e.g. one in configs/)")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}: "
                              f"{getattr(e, 'problem', None) or e}; fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
