"""Export a trained student as an ordinary open_clip model folder.

The folder holds ``open_clip_config.json`` (model and preprocessing config),
``open_clip_model.safetensors`` and ``open_clip_pytorch_model.bin`` (the same
weights), and ``<model>.json`` (the bare model config). Either of these loads
it without clip-ping installed::

    open_clip.create_model_and_transforms("local-dir:EXPORT_DIR")
    open_clip.add_model_config("EXPORT_DIR/<model>.json")
    open_clip.create_model_and_transforms("<model>", pretrained="EXPORT_DIR/open_clip_pytorch_model.bin")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import option
from .errors import ConfigError
from .student import load_checkpoint_file, register_model_configs


@dataclass
class ExportConfig:
    checkpoint: str = option("runs/train", "checkpoint file, or a run folder (its latest checkpoint)")
    out: str = option("runs/export", "folder to write the open_clip model into")


def export_open_clip(cfg: ExportConfig) -> dict[str, str]:
    import open_clip
    from safetensors.torch import save_file

    register_model_configs()
    state = load_checkpoint_file(cfg.checkpoint)
    model_name = state.get("model_name")
    model_cfg = open_clip.get_model_config(model_name) if model_name else None
    if model_cfg is None:
        raise ConfigError(f"checkpoint {cfg.checkpoint} names no known student model ({model_name!r})")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    image_size = model_cfg["vision_cfg"]["image_size"]
    preprocess_cfg = {
        "size": [image_size, image_size] if isinstance(image_size, int) else list(image_size),
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    (out / f"{model_name}.json").write_text(json.dumps(model_cfg, indent=2))
    weights = {k: v.contiguous() for k, v in state["model"].items()}
    save_file(weights, str(out / "open_clip_model.safetensors"))
    torch.save(weights, out / "open_clip_pytorch_model.bin")
    return {"exported": str(out), "model": model_name,
            "load_with": f"open_clip.create_model_and_transforms('local-dir:{out}')"}
