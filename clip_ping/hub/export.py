"""Export a trained student as an open_clip model folder in the Hugging Face hub layout.

The folder holds ``open_clip_config.json`` (model and preprocessing config),
``open_clip_model.safetensors`` and ``open_clip_pytorch_model.bin`` (the same
weights), ``README.md`` (the model card, generated from the run: data, method
and settings, evaluation table; `clip_ping.hub.model_card`) and ``<model>.json``
(the bare model config). Uploaded as is, it is a hub repository that
``open_clip.create_model_and_transforms("hf-hub:USER/REPO")`` loads; locally,
either of these loads it without clip-ping installed::

    open_clip.create_model_and_transforms("local-dir:EXPORT_DIR")
    open_clip.add_model_config("EXPORT_DIR/<model>.json")
    open_clip.create_model_and_transforms("<model>", pretrained="EXPORT_DIR/open_clip_pytorch_model.bin")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, option
from ..errors import ConfigError, DataError
from ..io import atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text
from ..model.student import load_checkpoint_file, load_export, nonfinite_tensors, register_model_configs


@dataclass
class ExportConfig(Config):
    checkpoint: str = option("runs/train", "checkpoint file, or a run folder (its latest checkpoint)")
    out: str = option("runs/export", "folder to write the open_clip model into")
    overwrite: bool = option(False, "replace an export already in --out instead of refusing")


def export_open_clip(cfg: ExportConfig) -> dict[str, str]:
    import open_clip
    from safetensors.torch import save

    from .model_card import model_card

    register_model_configs()
    state = load_checkpoint_file(cfg.checkpoint)
    model_name = state.get("model_name")
    model_cfg = open_clip.get_model_config(model_name) if model_name else None
    if model_name is None or model_cfg is None:
        raise ConfigError(f"checkpoint {cfg.checkpoint} names no known student model ({model_name!r})")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config key 'out': {out} is a file, not a folder")
    if (out / "open_clip_config.json").is_file() and not cfg.overwrite:
        raise ConfigError(f"{out} already holds an exported model; pass --overwrite to replace it, or another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"config key 'out': cannot create {out} ({exc.strerror})") from None
    model_cfg = portable_model_config(model_cfg)
    image_size = model_cfg["vision_cfg"]["image_size"]
    preprocess_cfg = {
        "size": [image_size, image_size] if isinstance(image_size, int) else list(image_size),
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    weights = {k: v.contiguous() for k, v in state["model"].items()}
    bad = nonfinite_tensors(weights)
    if bad:
        raise DataError(f"checkpoint {cfg.checkpoint} holds NaN or infinite weights ({len(bad)} tensors, e.g. {bad[0]}); "
                        "export an earlier checkpoint of the run")
    atomic_write(out / "open_clip_model.safetensors", lambda f: f.write(save(weights)))
    atomic_torch_save(weights, out / "open_clip_pytorch_model.bin")
    atomic_write_json(out / f"{model_name}.json", model_cfg)
    atomic_write_text(out / "README.md", model_card(model_name, state, _run_folder(cfg.checkpoint)))
    # written last: its presence means a complete export
    atomic_write_json(out / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    verify_export(out)  # what open_clip loads is what was trained
    return {"exported": str(out), "model": model_name,
            "load_with": f"open_clip.create_model_and_transforms('local-dir:{out}')"}


def portable_model_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """``model_cfg`` without the towers' ``block_type``.

    The shipped configs name open_clip's custom attention block, which trains faster on a CPU but which
    open_clip before 3.0 does not know. Its parameters and function are the default block's, so the export
    leaves the key out and loads in any open_clip. A tower with custom-block features (``qk_norm``...)
    still gets the custom block: open_clip picks it for them when no block type is named.
    """
    return {key: ({k: v for k, v in value.items() if k != "block_type"} if isinstance(value, dict) else value)
            for key, value in model_cfg.items()}


def _run_folder(checkpoint: str | Path) -> Path | None:
    """The run folder of a checkpoint (``RUN`` or ``RUN/checkpoints/x.pt``), where eval.json lives."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def verify_export(folder: str | Path) -> dict[str, int]:
    """Check that open_clip loads ``folder`` (see `load_export`); returns the count of weight tensors."""
    model, _ = load_export(folder)
    return {"tensors": len(model.state_dict())}
