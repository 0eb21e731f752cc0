"""An image transform split at the batch: geometry per sample, the pixels' float arithmetic once per batch.

open_clip's transforms (and timm's, which the image teachers use) end in ``ToTensor`` (8-bit pixels to floats in [0, 1])
and ``Normalize``. Per sample, those two cost about as much as the random crop
itself (a dozen small tensor calls each). On the stacked uint8 batch the same
arithmetic runs once, and every element goes through the same float operations
(divide by 255, subtract the mean, divide by the std), so the batch is bitwise
the one the per-sample transform stacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F


class PilToUint8:
    """An RGB or grey PIL image as a C x H x W uint8 tensor (what ``ToTensor`` reads, before its scaling)."""

    def __call__(self, pic: Image.Image) -> torch.Tensor:
        if not isinstance(pic, Image.Image) or pic.mode not in ("RGB", "L"):
            raise TypeError(f"expected an RGB or L PIL image, got {type(pic).__name__} "
                            f"{getattr(pic, 'mode', '')}".rstrip())
        return F.pil_to_tensor(pic)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True)
class BatchNormalize:
    """``ToTensor``'s scaling and ``Normalize`` on a B x C x H x W uint8 batch."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchNormalize expects uint8 images, got {images.dtype}")
        x = images.to(torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)


def _makes_rgb(step: Any) -> bool:
    """Whether a transform step converts a PIL image to RGB (open_clip's two spellings of it)."""
    if getattr(step, "mode", None) == "RGB" and type(step).__name__ == "MaybeConvertMode":
        return True
    return getattr(step, "__name__", None) == "_convert_to_rgb"


def split_at_batch(transform: Callable, rgb_input: bool = False) -> tuple[Callable, BatchNormalize | None]:
    """(per-sample transform giving uint8 tensors, the batch's finish), or ``(transform, None)``.

    Splits only a ``Compose`` that converts to RGB, then ends in ``ToTensor`` and
    ``Normalize`` with no in-place flag (open_clip's train and eval transforms);
    with ``rgb_input`` (the caller feeds `images.load_image`'s RGB images) the
    conversion need not be there (timm's eval transforms: resize, crop, ``ToTensor``
    and ``Normalize``). Any other transform runs whole per sample, as given.
    """
    steps = list(getattr(transform, "transforms", []))
    if (isinstance(transform, T.Compose) and len(steps) >= 2 and (rgb_input or (len(steps) >= 3 and _makes_rgb(steps[-3])))
            and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize) and not steps[-1].inplace):
        normalize = steps[-1]
        finish = BatchNormalize(tuple(float(m) for m in normalize.mean), tuple(float(s) for s in normalize.std))
        return T.Compose(steps[:-2] + [PilToUint8()]), finish
    return transform, None
