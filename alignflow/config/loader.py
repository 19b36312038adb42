"""The config loader: typed dataclass fields, YAML presets and dotted command-line overrides. The schemas
live beside it, one module per command (``config/rl.py`` for ``alignflow rl``, ...), with the sections several
commands share in ``config/sections.py``; ``alignflow.config`` re-exports them all.

Every field is declared with :func:`field`, which takes a one-line ``doc`` (shown by ``alignflow <cmd> --help``
and checked by a test to be present on every field) and optional ``choices`` or ``range`` that are
validated when the config is loaded. Mistakes fail at load time with a message that names the key and
the valid keys or the allowed values (cleanrl ``Args`` / torchtune ``key=value``)::

    cfg = load_config(SFTConfig, "configs/sft.yaml", ["optim.lr=3e-4", "train.max_steps=100"])

Global batch sizes are algorithmic; per-device (micro) sizes are performance knobs that never change the
maths (verl's rule): ``train.batch_size`` is the number of rows per optimiser step, ``train.micro_batch_tokens``
only decides how that step is split into forward/backward passes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

_Config = TypeVar("_Config")  # a config dataclass: load_config(SFTConfig, ...) -> SFTConfig


class ConfigError(ValueError):
    """A configuration mistake; the message says which key and what is allowed."""


def field(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    choices: tuple[Any, ...] | None = None,
    range: tuple[Any, Any] | None = None,
    default_factory: Any = dataclasses.MISSING,  # noqa: A002
    check: Callable[[Any, str], Any] | None = None,
    allow_inf: bool = False,
) -> Any:
    """A dataclass field with its documentation and validation rules.

    ``range`` is ``(low, high)`` inclusive; either end may be ``None``. ``check(value, key)`` returns the
    normalised value or raises ConfigError (for rules a range cannot say). NaN is refused for every number, and
    so is an infinite one unless ``allow_inf``.
    """
    meta = {"doc": doc, "choices": choices, "range": range, "check": check, "allow_inf": allow_inf}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- field checks
def check_betas(value: Any, key: str) -> list[float]:
    """AdamW's (beta1, beta2): two numbers, each in [0, 1)."""
    try:
        betas = [float(b) for b in value]
    except (TypeError, ValueError):
        betas = []
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{key}: {value!r} must be two numbers (beta1, beta2), each in [0, 1), e.g. [0.9, 0.999]")
    return betas


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def check_device(value: Any, key: str) -> str:
    """The device string's form (whether such a device exists is checked when the run starts)."""
    text = str(value)
    if not DEVICE_PATTERN.fullmatch(text):
        raise ConfigError(f"{key}: {text!r} is not a device; use auto, cpu, cuda, cuda:<index>, mps or xpu")
    return text


def check_micro_batch_tokens(value: Any, key: str) -> int:
    """0 (by device) or a budget of at least 16 tokens."""
    if isinstance(value, bool) or not isinstance(value, int) or (value != 0 and value < 16):
        raise ConfigError(f"{key}: {value!r} must be 0 (chosen for the device) or an integer >= 16")
    return int(value)


# ----------------------------------------------------------------------------------------------- loading
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` (strings come from the command line), or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0] if typing.get_args(tp) else None  # list[float]: each item converted
        return [_coerce(v, item, f"{key}[{i}]") if item is not None else v for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _nonfinite(value: Any, allow_inf: bool) -> float | None:
    """The first NaN (or, unless ``allow_inf``, infinite) float in ``value`` or its list/dict items; else None."""
    items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
    for item in items:
        if isinstance(item, float) and (math.isnan(item) or (math.isinf(item) and not allow_inf)):
            return item
        if isinstance(item, (list, dict)) and item is not value:
            bad = _nonfinite(item, allow_inf)
            if bad is not None:
                return bad
    return None


def _check(f: dataclasses.Field[Any], value: Any, key: str) -> Any:
    """Validate a coerced value against the field's rules; returns it (normalised by the field's ``check``)."""
    bad = _nonfinite(value, f.metadata.get("allow_inf", False))
    if bad is not None:
        raise ConfigError(f"{key}: {bad!r} is not allowed; give a finite number")
    if f.metadata.get("check") is not None:
        value = f.metadata["check"](value, key)
    choices, rng = f.metadata.get("choices"), f.metadata.get("range")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    if rng is not None and value is not None:
        lo, hi = rng
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(
                f"{key}: {value!r} is outside the allowed range "
                f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            )
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested dict of updates to a dataclass instance, validating every key and value."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = _field_types(type(obj))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'. Valid keys here: {', '.join(sorted(fields))}")
        tp = hints[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{key}: is a section; give its keys ({', '.join(f.name for f in dataclasses.fields(tp))})"
                )
            _apply(getattr(obj, name), value, key + ".")
            continue
        setattr(obj, name, _check(fields[name], _coerce(value, tp, key), key))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "train.seed=1"]`` -> ``{"optim": {"lr": "3e-4"}, "train": {"seed": "1"}}``."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = raw
    return out


def load_config(cls: type[_Config], path: str | Path | None = None, overrides: list[str] | None = None) -> _Config:
    """Build ``cls`` from defaults, then the YAML file at ``path``, then dotted ``overrides``."""
    cfg = cls()
    if path:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        check_preset_command(cls, data.pop("command", None), path)
        try:
            _apply(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        try:
            _apply(cfg, parse_overrides(overrides))
        except ConfigError as e:
            raise ConfigError(f"command line: {e}") from None
    check_sections(cfg)
    return cfg


def check_preset_command(cls: type, named: Any, path: Path) -> None:
    """A preset's ``command:`` key must name the command it is loaded for: the ``alignflow <command>`` its config
    class's docstring opens with."""
    match = re.match(r"\s*``alignflow (\w+)", cls.__doc__ or "")
    if named is None or match is None or named == match.group(1):
        return
    raise ConfigError(
        f"{path} is a preset for `alignflow {named}` (its command: key), not `alignflow "
        f"{match.group(1)}`; run: alignflow {named} --config {path}"
    )


def from_dict(cls: type[_Config], sections: dict[str, Any]) -> _Config:
    """Programmatic construction with the same validation as YAML: ``from_dict(SFTConfig, {"train": {...}})``."""
    cfg = cls()
    _apply(cfg, sections)
    check_sections(cfg)
    return cfg


def check_sections(cfg: Any, prefix: str = "") -> None:
    """Rules between keys, checked once a config is complete (in nested sections too, e.g. ``rl.`` of mpo)."""
    rules = getattr(cfg, "check_rules", None)  # a schema's own rules between its keys (RLConfig's batch sizes)
    if callable(rules):
        rules(prefix)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_sections(value, f"{prefix}{f.name}.")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def describe(cls: type, prefix: str = "") -> list[str]:
    """Lines 'key (default) -- doc' for every field, recursively; used by ``--help``."""
    lines = []
    obj = cls() if _is_dataclass_type(cls) else cls
    hints = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            lines += describe(getattr(obj, f.name), f"{prefix}{f.name}.")
        else:
            extra = f"; one of {'|'.join(map(str, f.metadata['choices']))}" if f.metadata.get("choices") else ""
            lines.append(f"  {prefix}{f.name} = {getattr(obj, f.name)!r}  -- {f.metadata.get('doc', '')}{extra}")
    return lines
