"""Teachers by name: the registry of named teachers and the generic specs (``timm:...``,
``open_clip:...``, ``sentence-transformers:...``, ``hf:...``) parsed into factories."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

from ..errors import ConfigError, DataError
from .base import ImageTeacher, TextTeacher, check_precision
from .image import TimmImageTeacher
from .text import HFTextTeacher, SentenceTransformerTeacher
from .towers import OpenClipImageTeacher, OpenClipTextTeacher

DEFAULT_IMAGE_TEACHER = "efficientnet-lite0"
DEFAULT_TEXT_TEACHER = "all-minilm-l6-v2"

# Prefixes of the generic specs, as written before the first ':'.
IMAGE_SPEC_PREFIXES = ("timm", "open_clip")
TEXT_SPEC_PREFIXES = ("open_clip", "sentence-transformers", "hf")

ImageFactory = Callable[[str], ImageTeacher]
TextFactory = Callable[[str], TextTeacher]
_Factory = TypeVar("_Factory", bound=Callable[..., Any])

_IMAGE_TEACHERS: dict[str, ImageFactory] = {}
_TEXT_TEACHERS: dict[str, TextFactory] = {}


def register_image_teacher(name: str) -> Callable[[_Factory], _Factory]:
    """Decorator: make ``factory(device) -> ImageTeacher`` (a class or function) loadable by ``name``."""

    def deco(factory: _Factory) -> _Factory:
        _check_registrable(name, IMAGE_SPEC_PREFIXES)
        _IMAGE_TEACHERS[name] = factory
        return factory

    return deco


def register_text_teacher(name: str) -> Callable[[_Factory], _Factory]:
    """Decorator: make ``factory(device) -> TextTeacher`` (a class or function) loadable by ``name``."""

    def deco(factory: _Factory) -> _Factory:
        _check_registrable(name, TEXT_SPEC_PREFIXES)
        _TEXT_TEACHERS[name] = factory
        return factory

    return deco


def _check_registrable(name: str, prefixes: tuple[str, ...]) -> None:
    if not name or name.split(":", 1)[0] in prefixes:
        raise ConfigError(f"cannot register a teacher named {name!r}: empty or clashes with a spec prefix")


def image_teacher_names() -> list[str]:
    """Registered image teacher names plus the generic spec forms."""
    return sorted(_IMAGE_TEACHERS) + ["timm:<arch>:<weights file>", "open_clip:<model>:<weights file>"]


def text_teacher_names() -> list[str]:
    """Registered text teacher names plus the generic spec forms."""
    return sorted(_TEXT_TEACHERS) + [
        "sentence-transformers:<dir>",
        "hf:<dir>",
        "open_clip:<model>:<weights file>",
    ]


def image_teacher_factory(spec: str) -> ImageFactory:
    """The factory ``(device) -> ImageTeacher`` that ``spec`` names, without loading anything.

    Cheap: use it to validate a spec early. Raises `ConfigError` for an unknown
    name and `DataError` for a missing weights file.
    """
    spec = spec.strip()
    if spec in _IMAGE_TEACHERS:
        return _IMAGE_TEACHERS[spec]
    prefix, _, rest = spec.partition(":")
    if prefix == "timm" and rest:
        arch, weights = _split_model_and_file(spec, rest)
        return lambda device: TimmImageTeacher(arch, weights, name=spec, device=device)
    if prefix == "open_clip" and rest:
        model_name, weights = _split_model_and_file(spec, rest)
        return lambda device: OpenClipImageTeacher(model_name, weights, name=spec, device=device)
    raise ConfigError(f"unknown image teacher '{spec}'; known: {', '.join(image_teacher_names())}")


def text_teacher_factory(spec: str) -> TextFactory:
    """The factory ``(device) -> TextTeacher`` that ``spec`` names, without loading anything (see above)."""
    spec = spec.strip()
    if spec in _TEXT_TEACHERS:
        return _TEXT_TEACHERS[spec]
    prefix, _, rest = spec.partition(":")
    if prefix == "sentence-transformers" and rest:
        folder = _existing(rest, spec, want_dir=True)
        return lambda device: SentenceTransformerTeacher(folder, name=spec, device=device)
    if prefix == "hf" and rest:
        folder = _existing(rest, spec, want_dir=True)
        return lambda device: HFTextTeacher(folder, name=spec, device=device)
    if prefix == "open_clip" and rest:
        model_name, weights = _split_model_and_file(spec, rest)
        return lambda device: OpenClipTextTeacher(model_name, weights, name=spec, device=device)
    raise ConfigError(f"unknown text teacher '{spec}'; known: {', '.join(text_teacher_names())}")


def load_image_teacher(spec: str, device: str = "cpu", precision: str = "fp32") -> ImageTeacher:
    """An image teacher by registered name or generic spec (see the module docstring), run in ``precision``.

    Raises `ConfigError` for an unknown name or precision and `DataError` for a missing weights file.
    """
    check_precision(precision)
    teacher = _checked(image_teacher_factory(spec)(device), spec, ("name", "dim", "encode", "transform"))
    teacher.precision = precision
    return teacher


def load_text_teacher(spec: str, device: str = "cpu", precision: str = "fp32") -> TextTeacher:
    """A text teacher by registered name or generic spec (see the module docstring), run in ``precision``.

    Raises `ConfigError` for an unknown name or precision and `DataError` for a missing model file or folder.
    """
    check_precision(precision)
    teacher = _checked(text_teacher_factory(spec)(device), spec)
    teacher.precision = precision
    return teacher


def _checked(teacher: Any, spec: str, attrs: tuple[str, ...] = ("name", "dim", "encode")) -> Any:
    # A custom factory that forgets an attribute should fail here, not mid-extraction.
    for attr in attrs:
        if not hasattr(teacher, attr):
            raise ConfigError(f"teacher '{spec}' has no '{attr}' attribute")
    return teacher


def _split_model_and_file(spec: str, rest: str) -> tuple[str, Path]:
    model, sep, path = rest.partition(":")
    if not sep or not model or not path:
        kind = spec.split(":", 1)[0]
        raise ConfigError(f"teacher spec '{spec}' must look like {kind}:<model>:<weights file>")
    return model, _existing(path, spec, want_dir=False)


def _existing(path: str, spec: str, want_dir: bool) -> Path:
    p = Path(path).expanduser()
    ok = p.is_dir() if want_dir else p.is_file()
    if not ok:
        what = "model folder" if want_dir else "weights file"
        raise DataError(f"{what} of teacher '{spec}' not found: {p}")
    return p

