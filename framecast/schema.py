"""Strict construction of typed dataclasses from plain data (YAML / JSON / `a.b=c` overrides).

Generic: nothing here knows framecast's sections. Every value is checked against its annotation, only
lossless conversions are made (int -> float, list -> tuple), and an unknown key or a wrong type is one
`ConfigError` that names the dotted key (architecture.md §2, "one config system").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, UserError


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`; convert only lossless cases (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4` without a dot as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} expects a float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} expects an int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key {key!r} expects a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return [coerce(v, arg, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r} got {value!r}, which matches none of {tp}")
    raise ConfigError(f"config key {key!r} has an unsupported type {tp}")  # pragma: no cover


def build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in section {prefix!r}" if prefix else ""
        raise ConfigError(f"unknown config key {'.'.join(filter(None, [prefix, unknown[0]]))!r}{where}; "
                          f"valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        kwargs[name] = build(tp, value, key) if dataclasses.is_dataclass(tp) else coerce(value, tp, key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form (tuples become lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))




def parse_override(text: str) -> dict[str, Any]:
    """`train.lr=3e-4` -> {"train": {"lr": 3e-4}}. Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def differing_keys(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two plain-data records (nested mappings are compared key by
    key): the one "same settings or refuse" comparison of run configs, pair-store manifests, recordings."""
    out = []
    for k in sorted(set(saved) | set(wanted)):
        a, b = saved.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{sub}" for sub in differing_keys(a, b)]
        elif a != b:
            out.append(k)
    return out


def read_json(path: str | Path, what: str, error: type[UserError]) -> Any:
    """A JSON file (a manifest, a log), or one `error` that names the file and why it cannot be read."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} {path} is corrupt or unreadable ({e.__class__.__name__}: {e})".splitlines()[0]) from None
