"""Strict construction of typed dataclasses from plain data (YAML / JSON / `a.b=c` overrides).

Generic: nothing here knows framecast's sections. Every value is checked against its annotation, only
lossless conversions are made (int -> float, list -> tuple), ints must fit in 64 bits, and a field that declares
a `Rule` (config.py: `steps: int = POSITIVE(100)`) must satisfy it. An unknown key, a wrong type or a value out
of range is one `ConfigError` that names the dotted key (architecture.md §2, "one config system"). The same
rules make the CLI's argument types (`arg_type`), and `device_problem` / `folder_problem` say whether this
machine has a device or can hold a folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError, UserError

INT64 = (-(2**63), 2**63 - 1)  # every int must fit: torch, numpy and safetensors keep int64
SEED_MAX = 2**32 - 1  # seeds are combined with step and shard numbers; numpy refuses negative ones
DEVICE = re.compile(r"(cpu|mps|cuda)(?::(\d+))?")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Which values a field accepts: a predicate, what it means (for the message), and whether a list or tuple
    value is checked item by item. Calling a rule makes a dataclass field that carries it."""

    what: str
    ok: Callable[[Any], bool]
    each: bool = True

    def __call__(self, default: Any) -> Any:
        if isinstance(default, list):  # a mutable default: a copy per instance
            return dataclasses.field(default_factory=lambda: list(default), metadata={"rule": self})
        return dataclasses.field(default=default, metadata={"rule": self})

    def check(self, value: Any, key: str) -> None:
        each = self.each and isinstance(value, (list, tuple))
        if not all(self.ok(v) for v in (value if each else (value,))):
            raise ConfigError(f"config key {key!r}: {'each value ' * each}must be {self.what}, got {value!r}")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _steps(v: list[int]) -> bool:
    return all(t >= 1 for t in v) and all(b < a for a, b in zip(v, v[1:]))


def one_of(*names: str) -> Any:
    """A string field that must be one of `names`; the first is its default."""
    return Rule(f"one of {list(names)}", lambda v: v in names)(names[0])


POSITIVE = Rule("an integer >= 1", lambda v: v >= 1)
NON_NEGATIVE = Rule("an integer >= 0", lambda v: v >= 0)
SEED = Rule(f"a seed in 0..{SEED_MAX}", lambda v: 0 <= v <= SEED_MAX)
PORT = Rule("a port in 1..65535", lambda v: 1 <= v <= 65535)
FINITE = Rule("a finite number", _finite)
FINITE_POSITIVE = Rule("a finite number > 0", lambda v: _finite(v) and v > 0)
FINITE_NON_NEGATIVE = Rule("a finite number >= 0", lambda v: _finite(v) and v >= 0)
PROBABILITY = Rule("a number in [0, 1]", lambda v: _finite(v) and 0 <= v <= 1)
DECAY = Rule("a number in [0, 1)", lambda v: _finite(v) and 0 <= v < 1)  # Adam betas, EMA decays
DEVICE_NAME = Rule("a device name: cpu, cuda, cuda:N or mps", lambda v: DEVICE.fullmatch(v) is not None)
STEP_LIST = Rule("a non-empty, strictly decreasing list of integers >= 1, e.g. [1000, 500]",
                 lambda v: bool(v) and _steps(v), each=False)
STEP_LIST_OR_EMPTY = Rule("[] or a strictly decreasing list of integers >= 1", _steps, each=False)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`; convert only lossless cases (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key {key!r} expects null, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4` without a dot as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} expects a float, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"config key {key!r}: {value!r} is too large for a float") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} expects an int, got {value!r}")
        if not INT64[0] <= value <= INT64[1]:
            raise ConfigError(f"config key {key!r}: {value} does not fit in a 64-bit integer")
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
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            return tuple(coerce(value, list[args[0]], key))
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
    """`cls` from plain data: every key known, every value of its annotated type and within its field's rule."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    rules = {f.name: f.metadata.get("rule") for f in dataclasses.fields(cls)}
    names = set(rules)
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in section {prefix!r}" if prefix else ""
        raise ConfigError(f"unknown config key {'.'.join(filter(None, [prefix, unknown[0]]))!r}{where}; "
                          f"valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, key)
            continue
        kwargs[name] = coerce(value, tp, key)
        if rules[name] is not None:
            rules[name].check(kwargs[name], key)
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a mapping that repeats a key is an error (YAML itself keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, it does not repeat a key
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"{self.what} file {self.name!r} repeats the key {key!r} (line {line}); YAML would "
                                  f"silently keep only the last one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from a file (no repeated keys), or a one-line ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {str(p)!r} does not exist" if not p.exists() else
                          f"{what} file {str(p)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} file {str(p)!r} is not a readable UTF-8 text file ({e.__class__.__name__}: "
                          f"{e})".splitlines()[0]) from None
    loader = _UniqueKeyLoader(text)
    loader.name, loader.what = str(p), what
    try:
        data = loader.get_single_data() or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {str(p)!r} is not valid YAML: {e}".splitlines()[0]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


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


# --- What this machine has, and the CLI's argument types ---


def device_problem(name: str) -> str | None:
    """Why the device `name` cannot be used on this machine, or None (cpu always works)."""
    import torch

    m = DEVICE.fullmatch(name)
    if m is None:
        return "not a device name (cpu, cuda, cuda:N or mps)"
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return None if index in (None, "0") else "a CPU has no index; use cpu"
    if kind == "mps":
        ok = torch.backends.mps.is_available() and index in (None, "0")
        return None if ok else "this machine has no Apple MPS device; use cpu"
    if not torch.cuda.is_available():
        return "this machine has no CUDA (torch.cuda.is_available() is False); use cpu"
    if index is not None and int(index) >= (n := torch.cuda.device_count()):
        return f"this machine has {n} CUDA device{'s' * (n != 1)} (cuda:0..cuda:{n - 1})"
    return None


def folder_problem(path: str | Path) -> str | None:
    """Why `path` cannot be (or be made) a writable folder, or None."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                return f"{str(q)!r} is not a folder" if q == p else f"{str(q)!r} (inside it) is not a folder"
            return None if os.access(q, os.W_OK | os.X_OK) else f"{str(q)!r} is not writable"
    return None


def arg_type(kind: type, rule: Rule | None = None, problem: Callable[[Any], str | None] | None = None):
    """An argparse `type=`: text -> `kind` within `rule` and without `problem`; argparse names the flag."""
    import argparse

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None
        if kind is int and not INT64[0] <= value <= INT64[1]:
            raise argparse.ArgumentTypeError(f"must fit in a 64-bit integer, got {text}")
        if rule is not None and not rule.ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule.what}, got {text}")
        if problem is not None and (why := problem(value)):
            raise argparse.ArgumentTypeError(f"{text!r}: {why}")
        return value

    parse.__name__ = rule.what if rule else kind.__name__
    return parse
