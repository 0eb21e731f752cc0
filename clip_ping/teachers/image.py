"""Image teachers from timm: pooled pre-classifier features of a timm model with local weights."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..errors import ConfigError
from .base import ImageTeacher, freeze, from_hub
from .weights import load_by_name, load_weights_in_order, read_state_dict


class TimmImageTeacher(ImageTeacher):
    """A timm model; features are the pooled pre-classifier activations.

    With a weights file, ``in_order=True`` maps the file's tensors onto the model by
    position (`load_weights_in_order`); otherwise by name, ignoring classifier tensors.
    With ``weights=None`` timm loads its pretrained weights for ``arch`` (``resnet50``,
    ``resnet50.a1_in1k``, ``hf-hub:ORG/REPO``) through its Hugging Face cache.
    """

    model: torch.nn.Module  # set in __init__ (the base class allows None)

    def __init__(
        self,
        arch: str,
        weights: str | Path | None,
        name: str | None = None,
        device: str = "cpu",
        in_order: bool = False,
    ) -> None:
        import timm
        from timm.data import create_transform, resolve_model_data_config

        spec = name or (f"timm:{arch}:{weights}" if weights is not None else f"timm:{arch}")
        if not arch.startswith("hf-hub:") and not timm.is_model(arch):
            raise ConfigError(f"timm has no model '{arch}' (see timm.list_models())")
        if weights is None:
            model = from_hub(spec, lambda: timm.create_model(arch, pretrained=True), "timm:<arch>:<weights file>")
        else:
            # Full model first: in-order mapping needs the classifier's slots too.
            model = timm.create_model(arch, pretrained=False)
            if in_order:
                load_weights_in_order(model, weights)
            else:
                load_by_name(model, read_state_dict(weights), weights)
        model.reset_classifier(0)  # forward() now returns pooled features
        # channels_last: oneDNN's convolutions (depthwise above all) run 1.5-2x faster on CPU.
        self.model = freeze(model).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.name = spec
        self.device = device
        self.dim = int(getattr(model, "num_features"))
        self.data_config = resolve_model_data_config(model)
        self._transform = create_transform(**self.data_config, is_training=False)

    def transform(self, img: Image.Image) -> torch.Tensor:
        return self._transform(img)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

