"""The teacher interfaces (`ImageTeacher`, `TextTeacher`) and how a teacher runs: its numeric
precision (fp32, or bf16 under autocast) and its input size (`transform_at_size`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Any, Callable, ContextManager, Iterator, TypeVar, cast

import torch
from PIL import Image

from ..errors import ClipPingError, ConfigError, DataError

_T = TypeVar("_T")
log = logging.getLogger(__name__)

# Numeric precision of a teacher's forward pass: fp32, or bf16 under torch.autocast. bf16 pays only
# where the hardware computes in it (GPUs; CPUs with AVX-512 BF16 or AMX); on an AVX2-only CPU
# oneDNN emulates it and a bf16 matmul is ~25x slower than fp32 (BENCHMARKS.md).
PRECISIONS = ("fp32", "bf16")

# torch.compile of the image teacher (inductor, weights frozen as constants). Over the folded forward in
# cache-sized calls it gains ~1.26x for a compile of about 20 s, which an extraction of 6,371 OpenClipart rows
# did not win back (1.16x slower from a fresh process; it pays from roughly 13,000 images by those figures,
# BENCHMARKS.md), so "auto" compiles on a CPU with a C++ compiler only when there are enough images.
COMPILE_SETTINGS = ("auto", "on", "off")

# On a CPU a convolutional teacher runs fastest when one call's activations stay in the cache: EfficientNet-Lite0
# folded, 2 threads, went from 70 images/s at 64 rows a call to 121 at 4 (224 px), and peaked at about this many
# input pixels a call at 112 and 64 px as well (BENCHMARKS.md, "The image teacher in cache-sized calls").
# Splitting a batch changes no feature: each image's forward is independent of the others in the call.
CPU_PIXELS_PER_CALL = 4 * 224 * 224
AUTO_COMPILE_MIN_IMAGES = 25_000  # about twice the ~13,000 images from which the compile pays on a 2-core AMX CPU


def compile_wanted(setting: str, device: str | torch.device, images: int) -> bool:
    """Whether to compile the image teacher: ``on``/``off`` as asked; ``auto`` on a CPU with a C++
    compiler (inductor needs one) for at least `AUTO_COMPILE_MIN_IMAGES` images. GPUs stay eager under
    ``auto`` (inductor there needs triton, and the eager forward is fast)."""
    if setting not in COMPILE_SETTINGS:
        raise ConfigError(f"teacher compile must be one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    has_compiler = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++"))
    return torch.device(device).type == "cpu" and has_compiler and images >= AUTO_COMPILE_MIN_IMAGES


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
    and ``device``, set ``_transform`` (the teacher's own preprocessing: resolution,
    crop, mean/std; or override `transform`) and implement ``_forward`` (a batch of
    transformed images to features). `encode` wraps ``_forward`` in inference mode.
    """

    name: str
    dim: int
    device: str = "cpu"
    precision: str = "fp32"  # see PRECISIONS; set by load_image_teacher(..., precision=)
    model: torch.nn.Module | None = None

    _transform: Callable[[Image.Image], torch.Tensor] | None = None

    def transform(self, img: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> C x H x W float tensor, as this teacher expects it (``_transform`` by default)."""
        if self._transform is None:
            raise NotImplementedError(f"image teacher '{self.name}' sets no _transform and does not override transform")
        return self._transform(img)

    cpu_pixels_per_call: int = CPU_PIXELS_PER_CALL  # see rows_per_call
    _eager_model: torch.nn.Module | None = None  # set while ``model`` is the compiled one
    _fixed_rows: int = 0  # rows of every compiled call (0: eager, any batch size)
    _compiled_ran: bool = False  # a compiled call has succeeded: later errors are real ones

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compile(self, rows: int) -> None:
        """From now on run ``model`` through ``torch.compile`` (inductor, weights frozen), always at ``rows``
        rows a call: a smaller batch is padded with zeros, a larger one split, so it compiles once.
        Features match the eager ones to ~1e-5. If compiling fails (no C++ compiler, say), the first
        `encode` warns and the teacher runs eagerly."""
        if self.model is None:
            raise ConfigError(f"image teacher '{self.name}' has no torch module to compile (set teacher compile off)")
        if rows < 1:
            raise ConfigError(f"teacher compile needs a batch of at least 1 row, got {rows}")
        if self._eager_model is None:
            self._eager_model = self.model
            self.model = cast(torch.nn.Module, torch.compile(self.model, dynamic=False, options={"freezing": True}))
        self._fixed_rows = rows

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """B x C x H x W (from `transform`) -> B x dim float32 features on the CPU, not normalised.

        The forward runs in ``self.precision`` (`autocast`); the result is float32 whatever it ran in.
        """
        if self.model is not None:
            self.model.eval()
        images = images.to(self.device)
        rows = self.rows_per_call(images)
        with torch.inference_mode(), autocast(self.device, self.precision):
            if self._fixed_rows:
                out = self._forward_compiled(images, rows)
            elif rows >= len(images):
                out = self._forward(images)
            else:
                out = torch.cat([self._forward(images[start:start + rows]) for start in range(0, len(images), rows)])
        return out.float().cpu()

    def rows_per_call(self, images: torch.Tensor) -> int:
        """Rows of one forward call: on a CPU as many images as fit ``cpu_pixels_per_call`` (at least one; 0: the
        whole batch), elsewhere the whole batch. A compiled teacher calls with its fixed rows (or that many pixels
        if fewer) whatever the batch, so that it compiles once."""
        rows = self._fixed_rows or max(1, len(images))
        if images.device.type == "cpu" and images.dim() == 4 and self.cpu_pixels_per_call:
            rows = min(rows, max(1, self.cpu_pixels_per_call // (images.shape[-1] * images.shape[-2])))
        return rows

    def _forward_compiled(self, images: torch.Tensor, n: int) -> torch.Tensor:
        parts = []
        for start in range(0, len(images), n):
            part = images[start:start + n]
            rows = len(part)
            if rows < n:
                part = torch.cat([part, part.new_zeros((n - rows, *part.shape[1:]))])
            elif not part.is_inference():
                part = part.clone()  # every call an inference tensor, as padded ones are: one compiled graph
            try:
                parts.append(self._forward(part)[:rows])
            except Exception as exc:  # inductor's errors have no common type: a first call that fails falls back
                if self._compiled_ran or self._eager_model is None:
                    raise
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                log.warning("image teacher '%s': torch.compile failed (%s); running it uncompiled", self.name, first[:200])
                self.model, self._eager_model, self._fixed_rows = self._eager_model, None, 0
                return torch.cat([self._forward(images[i:i + n]) for i in range(0, len(images), n)])
            self._compiled_ran = True
        return torch.cat(parts)


def image_transform_of(teacher: Any) -> Callable[[Image.Image], torch.Tensor]:
    """What ``teacher.transform`` does, as an object a loader can inspect and split (`split_at_batch`): the
    teacher's ``_transform`` unless its class overrides `ImageTeacher.transform` (then the method, which may do
    more; also for teachers that only look like an `ImageTeacher`)."""
    own = getattr(teacher, "_transform", None)
    if own is not None and getattr(type(teacher), "transform", None) is ImageTeacher.transform:
        return cast(Callable[[Image.Image], torch.Tensor], own)
    return cast(Callable[[Image.Image], torch.Tensor], teacher.transform)


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


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: a teacher never trains."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

def check_precision(precision: str) -> None:
    """Refuse a precision other than PRECISIONS in one line."""
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
    check_precision(precision)
    before = [getattr(t, "precision", "fp32") for t in teachers]
    for t in teachers:
        t.precision = precision
    try:
        yield
    finally:
        for t, p in zip(teachers, before):
            t.precision = p



def from_hub(spec: str, load: Callable[[], _T], local_form: str) -> _T:
    """Run ``load``, a library fetching pretrained weights through its own hub cache, and turn any failure
    (offline, unknown repository, no weights) into one line. The libraries honour the user's
    ``HF_HUB_OFFLINE`` and cache; clip-ping sets neither."""
    try:
        return load()
    except ClipPingError:
        raise
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise DataError(f"teacher '{spec}': cannot load its pretrained weights from the hub or the local cache "
                        f"({first[:200]}); with no network, save them where there is one and pass {local_form}") from None
