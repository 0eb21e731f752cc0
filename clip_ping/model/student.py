"""Student dual encoders: open_clip models built from the configs shipped here.

`model_configs/*.json` are ordinary open_clip model configs; they are added to
open_clip's registry so every open_clip tool (factory, tokenizer, transforms)
works on them unchanged:

- ``ViT-XS-16``: ~8M-parameter image tower (patch 16, width 256, depth 10,
  4 heads) with a width-256, 6-layer text transformer, embedding 256.
- ``ViT-XXS-8-64``: a CPU preset (64 px, patch 8, depth 4, width 128, context
  32) that trains in minutes on two cores.

Both use open_clip's custom attention block (``"block_type": "custom"``): the same
function and parameter names as its default block (``nn.MultiheadAttention``),
1.1x faster steps in bf16 and 1.15x in fp32 on a CPU (BENCHMARKS.md, "The students'
attention block"). Students start from the default block's initial weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError, DataError
from ..io import load_torch_file
from .checkpointing import checkpoint_in_place

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make the shipped configs known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def shipped_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or infinite values."""
    return [k for k, t in state.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]


def create_student(model_name: str, seed: int | None = None) -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    """(model, train transform, eval transform, tokenizer) for an open_clip model name.

    With ``seed`` the weights are initialised from that seed alone, so two runs
    that differ only in their loss start from the same student.
    """
    import open_clip

    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ConfigError(f"unknown student model '{model_name}'; shipped: {', '.join(shipped_models())}")
    with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
        if seed is not None:
            torch.manual_seed(seed)
        initial = _default_block_initial_weights(model_name)
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(model_name)
    own = model.state_dict()
    if initial is not None and initial.keys() == own.keys() and all(initial[k].shape == v.shape for k, v in own.items()):
        model.load_state_dict(initial)  # not where custom-block features (qk_norm...) add parameters of their own
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, preprocess_train, preprocess_val, tokenizer


def _default_block_initial_weights(model_name: str) -> dict[str, torch.Tensor] | None:
    """For a config with open_clip's custom attention block: the initial weights its default block draws.

    The two blocks compute the same function with the same parameter names, but the custom block draws
    its attention weights from other distributions (the image tower's q, k, v projections 2.8x wider),
    and the demo's students trained from those were worse (image-to-text R@1 about 3 points lower).
    Drawing the default block's weights keeps the students of earlier versions, seed for seed.
    """
    import open_clip

    cfg = open_clip.get_model_config(model_name)  # a copy of the registry's
    towers = [t for t in ("vision_cfg", "text_cfg") if (cfg or {}).get(t, {}).get("block_type") == "custom"]
    if not towers or cfg.get("custom_text"):
        return None
    for tower in towers:
        cfg[tower]["block_type"] = "default"
    return open_clip.model.CLIP(**cfg).state_dict()


class _quiet_random_init_warning(logging.Filter):
    """Hide open_clip's warning that a model starts from random weights: a student always does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    def __enter__(self) -> None:
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeFilter(self)


def enable_grad_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass; returns the number of blocks.

    open_clip 3.3's own switch (``set_grad_checkpointing``) calls each block with the default block's
    arguments, which the custom attention block of the shipped configs does not take. Each block is
    checkpointed in place instead (`model.checkpointing.checkpoint_in_place`), so parameter names and checkpoints
    stay as they are and the text blocks keep their attention mask on every supported torch.
    """
    blocks = [block for module in model.modules() if isinstance(getattr(module, "resblocks", None), torch.nn.ModuleList)
              for block in module.resblocks]
    for block in blocks:
        checkpoint_in_place(block)
    return len(blocks)


def embed_dim(model: Any) -> int:
    """The width of the shared image-text space of an open_clip model."""
    if hasattr(model, "text_projection"):
        return int(model.text_projection.shape[1])
    return int(model.visual.output_dim)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt" if (path / "checkpoints").is_dir() else path / "latest.pt"
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    state = load_torch_file(path)  # tensors and plain values only: never runs code from the file
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise DataError(f"{path} is not a clip-ping checkpoint (no 'model' weights in it)")
    return state


def checkpoint_weights(state: Any, checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The student's weights in a loaded checkpoint; one line when it holds none or names no known model."""
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise DataError(f"checkpoint {checkpoint} holds no student weights (no 'model' entry): not a clip-ping checkpoint")
    if not isinstance(state.get("model_name"), str):
        raise DataError(f"checkpoint {checkpoint} names no student model (no 'model_name' entry)")
    return state["model"]


def check_weights_fit(model: torch.nn.Module, weights: dict[str, Any], checkpoint: str | Path) -> None:
    """One line naming the first weight that the model the checkpoint names does not have, lacks, or holds in
    another shape (a checkpoint edited by hand, or of another model)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and (not isinstance(weights[k], torch.Tensor)
                                                      or tuple(weights[k].shape) != tuple(expected[k].shape))]
    if wrong:
        k = wrong[0]
        found = tuple(weights[k].shape) if isinstance(weights[k], torch.Tensor) else type(weights[k]).__name__
        problem = f"'{k}' has shape {found}, the model's is {tuple(expected[k].shape)}"
    elif missing or extra:
        problem = f"it lacks '{missing[0]}'" if missing else f"it holds '{extra[0]}', which the model does not have"
    else:
        return
    raise DataError(f"checkpoint {checkpoint}: its weights do not fit its model: {problem} "
                    f"({len(wrong)} of other shape, {len(missing)} missing, {len(extra)} unknown)")


def load_export(folder: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, eval transform) of an export folder, loaded by open_clip (``local-dir:``).

    Raises `DataError` in one line when the folder is not an export or its config
    does not fit its weights (e.g. an edited ``open_clip_config.json``).
    """
    import open_clip

    folder = Path(folder)
    if not (folder / "open_clip_config.json").is_file():
        raise DataError(f"{folder} is not an exported model: expected {folder / 'open_clip_config.json'}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        detail = next((line for line in lines if "size mismatch" in line or "Missing" in line), lines[0])
        raise DataError(f"{folder / 'open_clip_config.json'} does not match its weights: {detail}") from None
    return model, preprocess


def load_student(checkpoint: str | Path) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model, tokenizer, eval transform) from a clip-ping checkpoint, a run folder,
    or an exported open_clip folder (``open_clip_config.json`` + weights)."""
    import open_clip

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir() and (checkpoint / "open_clip_config.json").is_file():
        model, preprocess = load_export(checkpoint)  # a config that does not fit its weights: one line
        tokenizer = open_clip.get_tokenizer(f"local-dir:{checkpoint}")
        model.eval()
        return model, tokenizer, preprocess
    state = load_checkpoint_file(checkpoint)
    weights = checkpoint_weights(state, checkpoint)
    bad = nonfinite_tensors(weights)
    if bad:
        raise DataError(f"checkpoint {checkpoint} holds NaN or infinite weights ({len(bad)} tensors, e.g. {bad[0]}); "
                        "the run diverged: evaluate an earlier checkpoint")
    model, _, preprocess, tokenizer = create_student(state["model_name"])
    check_weights_fit(model, weights, checkpoint)
    model.load_state_dict(weights)
    model.eval()
    return model, tokenizer, preprocess


class StudentEncoders(torch.nn.Module):
    """The student and the objective as one module, so that DDP synchronises the
    gradients of both and torch.compile sees the student's forward."""

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, images: torch.Tensor, texts: torch.Tensor, views: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, ...]:
        """(u, v), then the embeddings of each extra view when ``views`` (B x V x C x H x W) is given:
        all views go through the image tower in one pass."""
        if views is None:
            return self.model.encode_image(images, normalize=True), self.model.encode_text(texts, normalize=True)
        n = len(images)
        every = self.model.encode_image(torch.cat([images, views.transpose(0, 1).flatten(0, 1)]), normalize=True)
        return (every[:n], self.model.encode_text(texts, normalize=True), *every[n:].split(n))
