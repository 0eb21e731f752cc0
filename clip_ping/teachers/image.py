"""Image teachers from timm: pooled pre-classifier features of a timm model with local weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ConfigError
from .base import ImageTeacher, freeze, from_hub
from .weights import load_by_name, load_weights_in_order, read_state_dict

log = logging.getLogger(__name__)


class TimmImageTeacher(ImageTeacher):
    """A timm model; features are the pooled pre-classifier activations.

    With a weights file, ``in_order=True`` maps the file's tensors onto the model by
    position (`load_weights_in_order`); otherwise by name, ignoring classifier tensors.
    With ``weights=None`` timm loads its pretrained weights for ``arch`` (``resnet50``,
    ``resnet50.a1_in1k``, ``hf-hub:ORG/REPO``) through its Hugging Face cache, unless
    ``random_init_seed`` is given: then the weights are timm's random initialisation
    under that seed (a deliberately weak baseline teacher; nothing is read or downloaded).
    """

    model: torch.nn.Module  # set in __init__ (the base class allows None)

    def __init__(
        self,
        arch: str,
        weights: str | Path | None,
        name: str | None = None,
        device: str = "cpu",
        in_order: bool = False,
        random_init_seed: int | None = None,
    ) -> None:
        import timm
        from timm.data import create_transform, resolve_model_data_config

        spec = name or (f"timm:{arch}:{weights}" if weights is not None else f"timm:{arch}")
        if not arch.startswith("hf-hub:") and not timm.is_model(arch):
            raise ConfigError(f"timm has no model '{arch}' (see timm.list_models())")
        if random_init_seed is not None:
            with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
                torch.manual_seed(random_init_seed)
                model = timm.create_model(arch, pretrained=False)
        elif weights is None:
            model = from_hub(spec, lambda: timm.create_model(arch, pretrained=True), "timm:<arch>:<weights file>")
        else:
            # Full model first: in-order mapping needs the classifier's slots too.
            model = timm.create_model(arch, pretrained=False)
            if in_order:
                load_weights_in_order(model, weights)
            else:
                load_by_name(model, read_state_dict(weights), weights)
        model.reset_classifier(0)  # forward() now returns pooled features
        self.data_config = resolve_model_data_config(model)
        self.dim = int(getattr(model, "num_features"))
        model = freeze(model)
        # channels_last: oneDNN's convolutions (depthwise above all) run 1.5-2x faster on CPU.
        folded = fold_batch_norms(model, self.data_config["input_size"])
        self.model = folded.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        # the network with the weights as loaded; bf16 runs it: folded scales rounded into bf16 weights lose accuracy
        self.model_as_loaded = model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.name = spec
        self.device = device
        self._transform = create_transform(**self.data_config, is_training=False)


    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        eager_low_precision = self.precision != "fp32" and self._eager_model is None
        return (self.model_as_loaded if eager_low_precision else self.model)(images)


def fold_batch_norms(model: torch.nn.Module, input_size: tuple[int, ...], atol: float = 1e-4) -> torch.nn.Module:
    """``model`` (frozen, eval mode) with each batch norm that directly follows a convolution folded into it.

    A frozen teacher's batch norms are fixed affine maps, so the convolution can
    absorb them (torch's `fuse_conv_bn_eval`); EfficientNet-Lite0's forward at
    224 px gets 1.44x faster on a CPU (BENCHMARKS.md, "Batch norms folded into the
    image teacher"). A batch norm is paired with the convolution registered just
    before it under the same parent; timm's ``BatchNormAct2d`` keeps its activation.
    The pairing is read from the module tree, not the forward, so the folded model
    is checked against the original on one random batch and, if they differ by
    more than ``atol`` (relative to the output's size), the original is returned.
    Features change by float rounding only (about 1e-5), like a compiled teacher's.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model)
    pairs = []
    for parent in folded.modules():
        conv_name = None
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Conv2d):
                conv_name = name
            elif isinstance(child, torch.nn.BatchNorm2d) and conv_name is not None:
                if child.track_running_stats and child.num_features == getattr(parent, conv_name).out_channels:
                    pairs.append((parent, conv_name, name))
                conv_name = None
            else:
                conv_name = None
    if not pairs:
        return model
    for parent, conv_name, bn_name in pairs:
        bn = getattr(parent, bn_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(getattr(parent, conv_name), bn))
        after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]  # BatchNormAct2d
        setattr(parent, bn_name, torch.nn.Sequential(*after))
    freeze(folded)
    probe = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = model(probe), folded(probe)
    error = float((want - got).abs().max()) / max(float(want.abs().max()), 1e-6)
    if error > atol:
        log.info("batch norms not folded into %s: the folded model differs by %.2g", type(model).__name__, error)
        return model
    return folded
