"""Typed configuration: dataclasses loaded from YAML, overridden from the CLI.

Every stage has one dataclass of plain fields. Precedence: dataclass defaults <
YAML file (``--config``) < command-line flags. Unknown keys and values of the
wrong type are refused with a one-line `ConfigError` that names the key.

A field's help text lives in ``field(metadata={"help": ...})`` so the CLI
``--help`` and the docs come from one place.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import types
import typing
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from .errors import ConfigError

T = TypeVar("T")


def option(default: Any, help: str, choices: tuple | None = None, positional: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with CLI help text (optional allowed values; ``positional``
    makes a list field the command's positional arguments, e.g. ``report RUN [RUN ...]``)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
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


class Config:
    """Base of every stage's config dataclass: checked whenever one is made.

    Choices and `validate` run in ``__post_init__``, so a config built in code
    (the demo, benchmarks, tests, ``dataclasses.replace``) is checked like one
    read from YAML or flags.
    """

    def __post_init__(self) -> None:
        _validate_choices(type(self), self)
        self.validate()

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
        _validate_choices(cls, obj)
        post = getattr(obj, "validate", None)
        if callable(post):
            post()
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


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
