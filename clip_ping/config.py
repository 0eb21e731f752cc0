"""Typed configuration: dataclasses loaded from YAML, overridden from the CLI.

Every stage has one dataclass of plain fields. Precedence: dataclass defaults <
YAML file (``--config``) < command-line flags. Unknown keys and values of the
wrong type are refused with a one-line `ConfigError` that names the key.

A field's help text lives in ``field(metadata={"help": ...})`` so the CLI
``--help`` and the docs come from one place. So do a number's bounds
(``option(..., bounds="[0, 1)")``): every int and float field of a config is
checked against them when the config is made, and NaN or infinity is refused
for every one, with a one-line message that names the key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar, cast

import yaml

from .errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a numeric option may take: an interval, either end open, closed or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False    # the low end itself is excluded
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"


def _number(x: float | None) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


_ONE_SIDED = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])$")


def parse_bounds(text: str) -> Bounds:
    """``">= 0"``, ``"> 0"``, ``"<= 1"``, ``"< 1"``, ``"[0, 1)"``, ``"(0, 1]"``... as `Bounds`."""
    if m := _ONE_SIDED.match(text.strip()):
        op, value = m.group(1), float(m.group(2))
        if op.startswith(">"):
            return Bounds(low=value, low_open=op == ">")
        return Bounds(high=value, high_open=op == "<")
    if m := _INTERVAL.match(text.strip()):
        return Bounds(float(m.group(2)), float(m.group(3)), m.group(1) == "(", m.group(4) == ")")
    raise ValueError(f"bounds {text!r}: write '>= 0', '> 0', '<= 1', '< 1' or an interval such as '[0, 1)'")


def option(default: Any, help: str, choices: tuple | None = None, positional: bool = False,
           bounds: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with CLI help text (optional allowed values; ``positional``
    makes a list field the command's positional arguments, e.g. ``report RUN [RUN ...]``;
    ``bounds`` the values a number may take, e.g. ``">= 0"`` or ``"[0, 1)"``, see `parse_bounds`)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if bounds is not None:
        meta["bounds"] = parse_bounds(bounds)
    if positional:
        meta["positional"] = True
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=partial(copy.copy, default), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def borrow(cls: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """A field with the help, choices and (unless given) default of ``cls``'s field ``name``:
    a config that passes an option on to another stage declares it without repeating it."""
    source = {f.name: f for f in dataclasses.fields(cls)}[name]
    if default is dataclasses.MISSING:
        if source.default_factory is not dataclasses.MISSING:
            return dataclasses.field(default_factory=source.default_factory, metadata=source.metadata)
        default = source.default
    return dataclasses.field(default=default, metadata=source.metadata)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, is_optional) for hints such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"config key '{name}' must not be empty")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if base is int and isinstance(value, bool):
                raise ValueError(value)
            return base(value)
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(base) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return [_coerce(name, v, item_tp) for v in value]
        if origin is dict or base is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{name}': cannot read {value!r} as {getattr(base, '__name__', base)}") from None
    return value


def _validate_choices(cls: type, obj: Any) -> None:
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value not in choices:
            raise ConfigError(f"config key '{f.name}': {value!r} is not one of {', '.join(map(str, choices))}")


def numeric_fields(cls: type) -> list[dataclasses.Field]:
    """The int and float fields of a config dataclass (optional ones and lists of numbers included)."""
    hints = _field_types(cls)
    found = []
    for f in dataclasses.fields(cls):
        base, _ = _base_type(hints[f.name])
        if typing.get_origin(base) in (list, tuple):
            base = (typing.get_args(base) or (str,))[0]
        if base in (int, float):
            found.append(f)
    return found


def _validate_numbers(cls: type, obj: Any) -> None:
    """NaN and infinity refused for every number; each number inside its field's bounds."""
    for f in numeric_fields(cls):
        value = getattr(obj, f.name)
        if value is None:
            continue
        bounds: Bounds | None = f.metadata.get("bounds")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"config key '{f.name}' must be a number, got {v!r}")
            if not math.isfinite(v):
                raise ConfigError(f"config key '{f.name}' must be a finite number, got {v}")
            if bounds is not None and not bounds.holds(v):
                raise ConfigError(f"config key '{f.name}' must be {bounds}, got {v}")


def validate_config(obj: Any) -> None:
    """Every check of a config dataclass: choices, numbers' bounds, then its own cross-field `validate`."""
    _validate_choices(type(obj), obj)
    _validate_numbers(type(obj), obj)
    post = getattr(obj, "validate", None)
    if callable(post):
        post()


class Config:
    """Base of every stage's config dataclass: checked whenever one is made.

    Choices and `validate` run in ``__post_init__``, so a config built in code
    (the demo, benchmarks, tests, ``dataclasses.replace``) is checked like one
    read from YAML or flags.
    """

    def __post_init__(self) -> None:
        validate_config(self)

    def validate(self) -> None:
        """Cross-field checks of a subclass; raise `ConfigError` with one line."""


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a mapping, refusing unknown keys with a suggestion."""
    known = {f.name: f for f in dataclasses.fields(cast(Any, cls))}
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}' in {where}{hint}")
        kwargs[name] = _coerce(name, value, hints[name])
    obj = cls(**kwargs)
    if not isinstance(obj, Config):  # a Config checked itself when made
        validate_config(obj)
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return data


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, plus ``--config FILE.yaml``."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (flags given here override it)")
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        base, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if default not in (None, "") and "default" not in help_text.lower():  # no default to show, or said already
            help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="*", default=argparse.SUPPRESS, help=f.metadata.get("help", ""),
                                metavar=f.name.upper().rstrip("S"))
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(base) in (list, tuple):
            kwargs["nargs"] = "+"
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        parser.add_argument(flag, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Defaults < YAML (``args.config``) < flags that were given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
        where = f"config file {args.config}"
    else:
        where = "config"
    for f in dataclasses.fields(cast(Any, cls)):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    cfg = from_dict(cls, values, where=where)
    located = getattr(cfg, "with_config_file", None)  # a config that depends on where its file lies
    return located(Path(args.config)) if callable(located) and getattr(args, "config", None) else cfg


def option_changes(recorded: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """'--key old -> new, ...' for the ``keys`` (default: all) that both hold with different values; '' when none.

    The one wording of every refusal to reuse work made with other options (a resumed run, a demo
    folder, a data set, a bank)."""
    names = [k for k in (keys if keys is not None else recorded) if k in recorded and k in current]
    return ", ".join(f"--{k.replace('_', '-')} {recorded[k]} -> {current[k]}" for k in names if recorded[k] != current[k])


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
