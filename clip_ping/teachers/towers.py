"""The two towers of an open_clip model as teachers: its image tower (image teacher) and its
text tower with its own tokenizer (text teacher). A trained clip-ping student can be one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError, DataError
from ..io import read_state_dict
from .base import ImageTeacher, TextTeacher, freeze, from_hub


def _create_open_clip(model_name: str, weights: Path | None, device: str, pretrained: str | None = None,
                      spec: str = "") -> tuple[torch.nn.Module, Callable]:
    """An open_clip model, frozen: weights from a file, or (``weights=None``) what open_clip loads for
    ``model_name`` + ``pretrained`` tag, an ``hf-hub:ORG/REPO`` or a ``local-dir:PATH`` name."""
    import open_clip

    from ..model.student import register_model_configs

    register_model_configs()  # a student config (e.g. a trained clip-ping model) can be a teacher
    schema = model_name.split(":", 1)[0] if model_name.startswith(("hf-hub:", "local-dir:")) else None
    if schema is None and model_name not in open_clip.list_models():
        raise ConfigError(f"open_clip has no model '{model_name}' (see open_clip.list_models())")
    if weights is None:
        def create() -> tuple[Any, Any, Any]:
            return open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device="cpu")

        if schema == "local-dir":  # nothing to fetch: a folder whose config does not fit its weights is the problem
            try:
                model, _, preprocess = create()
            except (RuntimeError, KeyError, ValueError, TypeError, OSError) as exc:
                raise DataError(f"teacher '{spec}': open_clip cannot load the folder: {str(exc).splitlines()[0]}") from None
        else:
            model, _, preprocess = from_hub(spec, create, "open_clip:<model>:<weights file>")
        return freeze(model).to(device), preprocess
    from open_clip.convert import convert_state_dict

    sd = read_state_dict(weights)  # a clip-ping checkpoint's 'model' or a state dict; never runs code from the file
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device="cpu")
    try:
        model.load_state_dict(convert_state_dict(model, sd), strict=True)  # open_clip converts third-party layouts
    except (RuntimeError, KeyError, ValueError) as exc:
        raise DataError(f"weights file {weights} does not fit open_clip model '{model_name}': {str(exc).splitlines()[0]}") from None
    return freeze(model).to(device), preprocess


def _path(weights: str | Path | None) -> Path | None:
    return None if weights is None else Path(weights)


class OpenClipImageTeacher(ImageTeacher):
    """The image tower of an open_clip model (see `_create_open_clip`); features are its (projected) image embedding."""

    def __init__(self, model_name: str, weights: str | Path | None, name: str | None = None, device: str = "cpu",
                 pretrained: str | None = None) -> None:
        self.name = name or f"open_clip:{model_name}:{weights or pretrained}"
        self.model, self._transform = _create_open_clip(model_name, _path(weights), device, pretrained, self.name)
        self.device = device
        self.dim = int(getattr(self.model.visual, "output_dim"))


    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class OpenClipTextTeacher(TextTeacher):
    """The text tower of an open_clip model (see `_create_open_clip`), with its own tokenizer."""

    def __init__(self, model_name: str, weights: str | Path | None, name: str | None = None, device: str = "cpu",
                 pretrained: str | None = None) -> None:
        import open_clip

        self.name = name or f"open_clip:{model_name}:{weights or pretrained}"
        self.model, _ = _create_open_clip(model_name, _path(weights), device, pretrained, self.name)
        try:
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as exc:  # a Hugging Face tokenizer that is not in the local cache
            raise DataError(f"cannot load the tokenizer of open_clip model '{model_name}' offline: {str(exc).splitlines()[0]}") from None
        self.device = device
        with torch.inference_mode():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(device)).shape[-1])

    def _forward(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

