"""Teachers by name: the registry of named teachers and the generic specs (``timm:...``,
``open_clip:...``, ``sentence-transformers:...``, ``hf:...``) parsed into factories."""

from __future__ import annotations

import re
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
    return sorted(_IMAGE_TEACHERS) + ["timm:<arch>[:<weights file>]", "open_clip:<model>:<weights file or tag>",
                                      "open_clip:hf-hub:<org/repo>", "open_clip:local-dir:<folder>"]


def text_teacher_names() -> list[str]:
    """Registered text teacher names plus the generic spec forms."""
    return sorted(_TEXT_TEACHERS) + [
        "sentence-transformers:<dir or hub name>",
        "hf:<dir or org/repo>",
        "open_clip:<model>:<weights file or tag>",
        "open_clip:hf-hub:<org/repo>",
        "open_clip:local-dir:<folder>",
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
        arch, weights = _timm_spec(spec, rest)
        return lambda device: TimmImageTeacher(arch, weights, name=spec, device=device)
    if prefix == "open_clip" and rest:
        model_name, weights, tag = _open_clip_spec(spec, rest)
        return lambda device: OpenClipImageTeacher(model_name, weights, name=spec, device=device, pretrained=tag)
    raise ConfigError(f"unknown image teacher '{spec}'; known: {', '.join(image_teacher_names())}")


def text_teacher_factory(spec: str) -> TextFactory:
    """The factory ``(device) -> TextTeacher`` that ``spec`` names, without loading anything (see above)."""
    spec = spec.strip()
    if spec in _TEXT_TEACHERS:
        return _TEXT_TEACHERS[spec]
    prefix, _, rest = spec.partition(":")
    if prefix == "sentence-transformers" and rest:
        where, hub = _folder_or_hub_name(spec, rest)
        return lambda device: SentenceTransformerTeacher(where, name=spec, device=device, hub=hub)
    if prefix == "hf" and rest:
        where, hub = _folder_or_hub_name(spec, rest)
        return lambda device: HFTextTeacher(where, name=spec, device=device, hub=hub)
    if prefix == "open_clip" and rest:
        model_name, weights, tag = _open_clip_spec(spec, rest)
        return lambda device: OpenClipTextTeacher(model_name, weights, name=spec, device=device, pretrained=tag)
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


def _timm_spec(spec: str, rest: str) -> tuple[str, Path | None]:
    """(arch, weights file) of ``timm:ARCH:FILE``; (arch, None) for timm's pretrained ``timm:ARCH``,
    ``timm:ARCH.TAG`` or ``timm:hf-hub:ORG/REPO``."""
    if rest.startswith("hf-hub:"):
        return rest, None
    arch, sep, path = rest.partition(":")
    if not sep:
        return arch, None
    if not arch or not path:
        raise ConfigError(f"teacher spec '{spec}' must look like timm:<arch> or timm:<arch>:<weights file>")
    return arch, _existing(path, spec, want_dir=False)


def _open_clip_spec(spec: str, rest: str) -> tuple[str, Path | None, str | None]:
    """(model, weights file, pretrained tag) of ``open_clip:MODEL:FILE`` or ``open_clip:MODEL:TAG``;
    (name, None, None) for ``open_clip:hf-hub:ORG/REPO`` and ``open_clip:local-dir:FOLDER``."""
    if rest.startswith("hf-hub:"):
        return rest, None, None
    if rest.startswith("local-dir:"):
        return "local-dir:" + str(_existing(rest[len("local-dir:"):], spec, want_dir=True)), None, None
    model, sep, tail = rest.partition(":")
    if not sep or not model or not tail:
        raise ConfigError(f"teacher spec '{spec}' must look like open_clip:<model>:<weights file or pretrained tag>")
    if Path(tail).expanduser().is_file():
        return model, Path(tail).expanduser(), None
    import open_clip

    if open_clip.get_pretrained_cfg(model, tail):
        return model, None, tail
    if "/" in tail or Path(tail).suffix:
        _existing(tail, spec, want_dir=False)  # a path: "weights file ... not found"
    tags = open_clip.list_pretrained_tags_by_model(model)
    raise ConfigError(f"teacher '{spec}': '{tail}' is neither a weights file nor a pretrained tag of open_clip model "
                      f"{model} (tags: {', '.join(tags) or 'none'})")


# A hub repository name: NAME or ORG/NAME (a path that does not exist looks otherwise: /..., ./..., ~/...)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _folder_or_hub_name(spec: str, rest: str) -> tuple[str, bool]:
    """(where, from the hub): a local model folder, else a hub repository name the library loads."""
    folder = Path(rest).expanduser()
    if folder.is_dir():
        return str(folder), False
    if _REPO_ID.match(rest):
        return rest, True
    return str(_existing(rest, spec, want_dir=True)), False  # raises: "model folder ... not found"


def _existing(path: str, spec: str, want_dir: bool) -> Path:
    p = Path(path).expanduser()
    ok = p.is_dir() if want_dir else p.is_file()
    if not ok:
        what = "model folder" if want_dir else "weights file"
        raise DataError(f"{what} of teacher '{spec}' not found: {p}")
    return p

