"""Start a student from pretrained open_clip weights (`TrainConfig.init_from`).

A source is one of:

- a weights file: an open_clip state dict (``.pt``/``.pth``/``.bin``/``.safetensors``,
  open_clip's conversions of third-party layouts apply) or a clip-ping checkpoint;
- a model folder: ``local-dir:PATH`` or a folder holding ``open_clip_config.json``
  (an open_clip hub folder, e.g. one `clip-ping export` wrote);
- ``MODEL:TAG`` (one of ``open_clip.list_pretrained()``) or ``hf-hub:ORG/REPO``: open_clip
  fetches the weights into its cache (Hugging Face hub, or the tag's URL). This needs
  the network or a filled cache; clip-ping never sets ``HF_HUB_OFFLINE`` either way.

The weights must fit the student exactly: every key, every shape (`check_fits`);
a folder's or hub repository's model config must agree with the student's.
Resuming a run never reads the source again: its checkpoint holds the weights.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ClipPingError, ConfigError, DataError
from ..io import read_state_dict

log = logging.getLogger(__name__)

# open_clip's preference among the weights of a model folder (open_clip.factory._find_checkpoint_in_dir)
_FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                   "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_TAG = re.compile(r"^([\w.\-]+):([\w.\-]+)$")  # MODEL:TAG (open_clip's names and tags hold no path separator)


@dataclass
class InitSource:
    """Where the weights of ``spec`` are: a local file, and the model config its folder or repository states."""

    spec: str
    weights: Path
    model_cfg: dict[str, Any] | None = None


def is_remote(spec: str) -> bool:
    """Whether ``spec`` names weights open_clip fetches (``hf-hub:`` or ``MODEL:TAG``) rather than a local path."""
    return spec.startswith("hf-hub:") or (not Path(spec).expanduser().exists() and bool(_TAG.match(spec)))


def resolve(spec: str, model_name: str) -> InitSource:
    """The local weights file of ``spec`` (fetched by open_clip for hub names) for student ``model_name``.

    Raises `DataError` for a missing file or folder, `ConfigError` for a name that is
    neither, and `ClipPingError` in one line when the hub cannot be reached.
    """
    import open_clip

    spec = spec.strip()
    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:"):]
        cfg = _fetch(spec, lambda: open_clip.get_model_config(spec))
        return InitSource(spec, Path(_fetch(spec, lambda: open_clip.download_pretrained_from_hf(repo))), cfg)
    path = Path(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec).expanduser()
    if path.is_dir():
        return _folder(spec, path)
    if path.is_file():
        return InitSource(spec, path)
    if spec.startswith("local-dir:"):
        raise DataError(f"init_from: model folder not found: {path}")
    match = _TAG.match(spec)
    if match and path.suffix not in (".pt", ".pth", ".bin", ".safetensors"):
        name, tag = match.groups()
        if name != model_name:
            raise ConfigError(f"init_from '{spec}' holds weights of open_clip model {name}, but the student is "
                              f"{model_name}; pass --model {name}")
        pretrained_cfg = open_clip.get_pretrained_cfg(name, tag)
        if not pretrained_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ConfigError(f"init_from '{spec}': open_clip has no pretrained tag '{tag}' for {name} "
                              f"(known: {', '.join(tags) or 'none'})")
        model_gelu = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
        if bool(pretrained_cfg.get("quick_gelu", False)) != model_gelu:  # same weights, another activation
            raise ConfigError(f"init_from '{spec}': these weights were trained with{'out' if model_gelu else ''} "
                              f"QuickGELU, the student {name} uses {'it' if model_gelu else 'GELU'}; pass "
                              f"--model {name.removesuffix('-quickgelu') if model_gelu else name + '-quickgelu'}")
        return InitSource(spec, Path(_fetch(spec, lambda: open_clip.download_pretrained(pretrained_cfg))))
    if "/" in spec or path.suffix:
        raise DataError(f"init_from: weights file not found: {path}")
    raise ConfigError(f"init_from '{spec}' is not a weights file, a model folder, MODEL:TAG or hf-hub:ORG/REPO")


def _fetch(spec: str, get: Any) -> Any:
    """Run open_clip's hub / URL fetch, turning any failure into one line."""
    try:
        result = get()
    except Exception as exc:  # offline (HF_HUB_OFFLINE=1 or no network), unknown repository, ...
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ClipPingError(f"init_from '{spec}': cannot fetch it from the hub ({first[:200]}); with no network, "
                            "copy the weights file or model folder here and pass its path") from None
    if not result:
        raise ClipPingError(f"init_from '{spec}': open_clip found no weights for it")
    return result


def _folder(spec: str, folder: Path) -> InitSource:
    import json

    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise DataError(f"init_from: {folder} is not an open_clip model folder: expected {config}")
    try:
        model_cfg = json.loads(config.read_text())["model_cfg"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"init_from: {config} holds no 'model_cfg'") from None
    weights = next((folder / n for n in _FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise DataError(f"init_from: {folder} holds no weights file ({', '.join(_FOLDER_WEIGHTS[:3])}, ...)")
    return InitSource(spec, weights, model_cfg)


def read_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The open_clip state dict in ``path``: a clip-ping checkpoint's ``model``, an open_clip state dict, or a
    third-party layout open_clip converts. Read without running code from the file (`clip_ping.io.read_state_dict`)."""
    from open_clip.convert import convert_state_dict

    try:
        sd = read_state_dict(path)
    except DataError as exc:
        raise DataError(f"init_from: {exc}") from None
    if not sd:
        raise DataError(f"init_from: {path} does not hold a state dict")
    try:
        return dict(convert_state_dict(model, sd))
    except Exception as exc:  # a layout open_clip recognises but cannot convert
        raise DataError(f"init_from: cannot convert the weights in {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def first_mismatch(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> str | None:
    """'KEY (why)' for the first key, in the model's order, that the state dict does not fill exactly; None if it fits."""
    own = model.state_dict()
    for key, ref in own.items():
        if key not in sd:
            return f"'{key}' (missing from the file)"
        if not isinstance(sd[key], torch.Tensor) or tuple(sd[key].shape) != tuple(ref.shape):
            shape = tuple(sd[key].shape) if isinstance(sd[key], torch.Tensor) else type(sd[key]).__name__
            return f"'{key}' (shape {shape} in the file, {tuple(ref.shape)} in the model)"
    extra = next((k for k in sd if k not in own), None)
    return f"'{extra}' (in the file, not in the model)" if extra else None


def first_config_difference(theirs: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> str | None:
    """The first setting the two open_clip model configs give different values (keys in only one are skipped,
    but ``quick_gelu`` counts as false when absent: it changes the function, not the weights)."""
    keys = list(ours) + [k for k in theirs if k not in ours]
    for key in keys:
        a = theirs.get(key, False if key == "quick_gelu" else None)
        b = ours.get(key, False if key == "quick_gelu" else None)
        if a is None or b is None:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = first_config_difference(a, b, f"{prefix}{key}.")
            if inner:
                return inner
        elif (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            return f"'{prefix}{key}' ({a!r} there, {b!r} in the student)"
    return None


def init_student(model: torch.nn.Module, spec: str, model_name: str) -> dict[str, Any]:
    """Load the weights ``spec`` names into ``model`` (student ``model_name``), all or nothing.

    Returns what was loaded (source, file, tensors). Raises one-line errors for a source
    that cannot be found or fetched, and for weights or a config that do not fit the student.
    """
    import open_clip

    source = resolve(spec, model_name)
    if source.model_cfg is not None:
        ours = open_clip.get_model_config(model_name) or {}
        diff = first_config_difference(source.model_cfg, ours)
        if diff:
            raise ConfigError(f"init_from '{spec}' is a model of another config than student {model_name}: "
                              f"first difference {diff}")
    sd = read_weights(source.weights, model)
    mismatch = first_mismatch(model, sd)
    if mismatch:
        raise ConfigError(f"init_from '{spec}' does not fit student model {model_name}: first mismatched key {mismatch}")
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)
    log.info("student %s initialised from %s (%s, %d tensors)", model_name, spec, source.weights, len(sd))
    return {"init_from": spec, "file": str(source.weights), "tensors": len(sd)}
