"""Dataclass configs from YAML, with errors that name the file, the key and the value.

A config is a (possibly nested) dataclass with documented defaults. `load_config`
reads YAML, rejects unknown keys (suggesting the closest known one), checks types,
and applies `key.sub=value` overrides from the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from .errors import MindprintError

T = TypeVar("T")


class ConfigError(MindprintError):
    pass


def _where(source: str, key: str) -> str:
    return f"{source}: key '{key}'" if key else source


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, source, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:     # Optional[X]: X's own message (e.g. "not a finite number")
            raise ConfigError(errors[0])
        raise ConfigError(f"{_where(source, key)}: {value!r} is not a valid "
                          f"{' or '.join(_type_name(a) for a in args)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{_where(source, key)}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, key)}: expected a mapping, got {value!r}")
        return from_dict(tp, value, source, prefix=key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(source, key)}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, key)}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{_where(source, key)}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{_where(source, key)}: expected an integer, got {value!r}")
        try:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (ValueError, OverflowError):
            raise ConfigError(f"{_where(source, key)}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{_where(source, key)}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{_where(source, key)}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{_where(source, key)}: {value!r} is not a finite number")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{_where(source, key)}: expected a string, got {value!r}")
        return str(value)
    return value


def check_finite_fields(obj: Any) -> None:
    """Every float field of dataclass `obj` is finite (NaN and inf are never a setting)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"key '{f.name}': {v!r} is not a finite number")


def check_values(obj: Any, checks: Iterable[tuple[str, bool]]) -> None:
    """For a dataclass's `validate()`: a float field that is NaN or inf, or else the first
    (key, ok) that is not ok, is a ConfigError naming the key and its value."""
    check_finite_fields(obj)
    for key, ok in checks:
        if not ok:
            raise ConfigError(f"key '{key}': invalid value {getattr(obj, key)!r}")


# Keys of earlier versions and the names that replaced them (TRL's and mlx-lm's names, the
# ones PPOConfig always had). An old key is an error that names its replacement.
RENAMED_KEYS = {"lr": "learning_rate", "lora_r": "lora_rank",
                "grad_accumulation": "gradient_accumulation_steps", "max_len": "max_seq_length"}


def unknown_key(source: str, k: str, known: Iterable[str], prefix: str = "") -> ConfigError:
    """The error for key `k` that is none of `known`: a renamed key names its new name, any
    other the closest known one."""
    known = list(known)
    key = f"{prefix}.{k}" if prefix else k
    if RENAMED_KEYS.get(k) in known:
        new = f"{prefix}.{RENAMED_KEYS[k]}" if prefix else RENAMED_KEYS[k]
        return ConfigError(f"{source}: key '{key}' was renamed to '{new}' (one vocabulary "
                           "across SFT, reward and PPO: the names TRL and mlx-lm use)")
    close = difflib.get_close_matches(k, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}; known keys: {', '.join(sorted(known))}")


def _default_changes(f: dataclasses.Field, cls: type) -> dict:
    """Where a section's default (its field's default_factory) differs from `cls()`: a YAML
    section is merged over those values, so that e.g. the pipeline's own PPO default stays
    unless the section sets the key."""
    if f.default_factory is dataclasses.MISSING:
        return {}
    default, plain = f.default_factory(), cls()
    return {g.name: to_dict(getattr(default, g.name)) for g in dataclasses.fields(cls)
            if g.init and getattr(default, g.name) != getattr(plain, g.name)}


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<config>",
              prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise unknown_key(source, str(k), fields, prefix)
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, Mapping):
            v = {**_default_changes(fields[k], hints[k]), **v}
        kwargs[k] = _coerce(v, hints[k], source, key)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_overrides(items: Iterable[str]) -> dict:
    """`["ppo.learning_rate=1e-5", "seed=3"]` -> nested dict with YAML-parsed values."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the
    last one silently)."""


class DuplicateYAMLKey(yaml.YAMLError):
    def __init__(self, key, line: int):
        self.key, self.line = key, line
        super().__init__(f"duplicate key {key!r}")


def _strict_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:   # before merging: a key may override a merged (<<) one
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:   # an unhashable key: let the constructor report it
            continue
        if first != key_node.start_mark.line + 1:
            raise DuplicateYAMLKey(key, key_node.start_mark.line + 1)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def yaml_load_strict(text: str):
    """yaml.safe_load, but a repeated key in any mapping raises DuplicateYAMLKey."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml_load_strict(path.read_text(encoding="utf-8"))
    except DuplicateYAMLKey as e:
        raise ConfigError(f"{path}:{e.line}: duplicate key {e.key!r} (the first one would be "
                          "silently ignored)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None, cls: type[T],
                overrides: Iterable[str] | Mapping | None = None) -> T:
    """Load `cls` from a YAML file (or defaults when path is None) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
        data = deep_merge(data, extra)
        source += " (with overrides)" if overrides else ""
    return from_dict(cls, data, source)


def load_run_config(path: str | os.PathLike | None, run_cls: type, trainer_cls: type,
                    overrides: Iterable[str] | Mapping | None = None,
                    section: str | None = None) -> tuple[Any, Any]:
    """(run, trainer) configs from one YAML file holding both: each top-level key goes to the
    dataclass that has a field of that name (the two share none), and with `section` (e.g.
    "ppo") a mapping under that key holds trainer keys too. Unknown keys are errors naming
    the file and the closest known key of either."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
        data = deep_merge(data, extra)
        source += " (with overrides)"
    run_keys = [f.name for f in dataclasses.fields(run_cls) if f.init]
    trainer_keys = [f.name for f in dataclasses.fields(trainer_cls) if f.init]
    assert not set(run_keys) & set(trainer_keys), "a key must belong to one of the two"
    run, flat, nested = {}, {}, {}
    for k, v in data.items():
        k = str(k)
        if section is not None and k == section:
            if not isinstance(v, Mapping):
                raise ConfigError(f"{source}: key '{k}': expected a mapping, got {v!r}")
            for sk in v:
                if str(sk) not in trainer_keys:
                    raise unknown_key(source, str(sk), trainer_keys, prefix=section)
            nested = dict(v)
        elif k in run_keys:
            run[k] = v
        elif k in trainer_keys:
            flat[k] = v
        else:
            known = run_keys + trainer_keys + ([section] if section else [])
            raise unknown_key(source, k, known)
    for k in flat:
        if k in nested:
            raise ConfigError(f"{source}: key '{k}' is set both at the top level and as "
                              f"'{section}.{k}'; keep one")
    return from_dict(run_cls, run, source), from_dict(trainer_cls, {**flat, **nested}, source)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
