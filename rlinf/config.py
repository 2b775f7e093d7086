"""Typed, frozen dataclass configs with YAML and dotted ``key=value`` overrides.

The dataclasses hold every default; YAML files and the command line only override them.
Unknown keys and values of the wrong type are errors that say what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlinf.errors import ConfigError

T = TypeVar("T")


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Builds ``cls`` from its defaults, then a YAML file, then dotted ``key=value`` overrides.

    Args:
        cls: a dataclass type (nested dataclasses are sections).
        yaml_path: optional YAML file whose keys override the defaults.
        overrides: strings like ``"actor.lr=1e-5"``; values are parsed as YAML scalars/lists.
    """
    data: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {loaded!r}.")
        data = loaded
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turns ``["a.b=1", "c=[1, 2]"]`` into ``{"a": {"b": 1}, "c": [1, 2]}``."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value; e.g. actor.lr=1e-5.")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} sets a key under {part!r}, which was given a value.")
            node = child
        node[parts[-1]] = value
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merges two nested dicts; ``over`` wins."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Builds dataclass ``cls`` from a nested mapping, checking keys and types."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        where = f"{path}.{key}" if path else key
        near = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" Did you mean {(path + '.' if path else '') + near[0]!r}?" if near else ""
        raise ConfigError(
            f"unknown config key {where!r}.{hint} Known keys{' of ' + path if path else ''}: "
            f"{', '.join(sorted(fields))}."
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Turns a (nested) config dataclass into plain dicts/lists/scalars, e.g. for YAML dumps."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Writes a config as YAML (the resolved config of a run)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(arm, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}.")
    if origin is typing.Literal:
        if value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{path}: {value!r} is not one of {list(args)}.{hint}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        return from_dict(tp, value if value is not None else {}, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{path}: {value!r} is not one of {[m.value for m in tp]}.") from None
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ConfigError(f"{path}: expected a list, got {value!r}; write e.g. {path}=[1, 2].")
        items = list(value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(items)} ({value!r}).")
            return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, items, strict=True)))
        item_tp = args[0] if args else Any
        coerced = [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(items)]
        return tuple(coerced) if origin is tuple else coerced
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}.")
        val_tp = args[1] if len(args) == 2 else Any
        # a null section drops its entry, so `placement.components.rollout=null` removes one from the command line
        drop_null = dataclasses.is_dataclass(val_tp)
        return {str(k): _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items() if not (drop_null and v is None)}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _is_number(value):
            return float(value)  # YAML reads "1e-5" (no dot) as a string
        raise ConfigError(f"{path}: expected a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}.")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
