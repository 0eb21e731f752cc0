"""Image views for objectives that need more than the student's one augmented view.

- `simclr_view_transform`: SimCLR's augmentation at the student's resolution and
  normalisation (SLIP's image-only views).
- `to_teacher_input`: the student's augmented tensor turned into a teacher's input
  (undo the student's normalisation, resize, apply the teacher's), so an online
  teacher sees exactly the view the student sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torchvision import transforms as T


@dataclass(frozen=True)
class ImageGeometry:
    """Size (H, W) and per-channel normalisation of an image tensor pipeline."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def geometry_of(transform: Callable[..., Any]) -> ImageGeometry:
    """The output size and normalisation of a torchvision ``Compose`` (open_clip's and timm's transforms)."""
    size, mean, std = None, None, None
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, (T.RandomResizedCrop, T.CenterCrop)):
            size = t.size
        elif isinstance(t, T.Resize) and size is None:
            size = t.size
        elif isinstance(t, T.Normalize):
            mean, std = t.mean, t.std
    if size is None or mean is None:
        raise ValueError(f"cannot read the output size and normalisation of the transform {transform}")
    if isinstance(size, int) or len(size) == 1:
        size = (int(size if isinstance(size, int) else size[0]),) * 2
    return ImageGeometry((int(size[0]), int(size[1])), tuple(map(float, mean)), tuple(map(float, std)))  # type: ignore[arg-type]


def simclr_view_transform(student_transform: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """SimCLR's augmentation (random resized crop from 8 %, flip, colour jitter, greyscale, blur),
    as SLIP uses it, at the student's size and normalisation."""
    geo = geometry_of(student_transform)
    blur = max(3, (geo.size[0] // 10) | 1)  # an odd kernel of ~10 % of the side, as SimCLR
    return T.Compose([
        T.RandomResizedCrop(geo.size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(geo.mean, geo.std),
    ])


def to_teacher_input(images: torch.Tensor, student: ImageGeometry, teacher: ImageGeometry) -> torch.Tensor:
    """B x 3 x H x W student-normalised views -> the teacher's resolution and normalisation
    (bilinear resize with antialiasing; pixel values clamped to [0, 1] first)."""
    mean_s = torch.tensor(student.mean, device=images.device).view(1, 3, 1, 1)
    std_s = torch.tensor(student.std, device=images.device).view(1, 3, 1, 1)
    pixels = (images.float() * std_s + mean_s).clamp(0.0, 1.0)
    if tuple(pixels.shape[-2:]) != teacher.size:
        pixels = F.interpolate(pixels, size=teacher.size, mode="bilinear", antialias=True, align_corners=False)
    mean_t = torch.tensor(teacher.mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(teacher.std, device=images.device).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t
