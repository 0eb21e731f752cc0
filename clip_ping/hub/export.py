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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, option
from ..errors import ConfigError, DataError
from ..io import (
    LOCK,
    MARKER,
    DiskFull,
    FolderClaim,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    claim_folder,
    disk_full_cause,
)
from ..model.student import (
    check_weights_fit,
    checkpoint_weights,
    create_student,
    load_checkpoint_file,
    load_export,
    nonfinite_tensors,
    register_model_configs,
)
from .model_card import model_card


@dataclass
class ExportConfig(Config):
    checkpoint: str = option("runs/train", "checkpoint file, or a run folder (its latest checkpoint)")
    out: str = option("runs/export", "folder to write the open_clip model into")
    overwrite: bool = option(False, "replace an export already in --out instead of refusing")


EXPORT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "README.md", "open_clip_config.json")
_TEMP_MARK = ".export-tmp"


def export_open_clip(cfg: ExportConfig) -> dict[str, str]:
    """Write the export into a temporary folder beside ``--out`` and move it into place at the end: an export
    that fails or is killed leaves no half-written model (a killed one's temporary folder is removed by the
    next export to that place)."""
    import open_clip

    register_model_configs()
    state = load_checkpoint_file(cfg.checkpoint)
    weights = checkpoint_weights(state, cfg.checkpoint)
    model_name = state["model_name"]
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ConfigError(f"checkpoint {cfg.checkpoint} names no known student model ({model_name!r})")
    check_weights_fit(create_student(model_name)[0], weights, cfg.checkpoint)
    weights = {k: v.contiguous() for k, v in weights.items()}
    bad = nonfinite_tensors(weights)
    if bad:
        raise DataError(f"checkpoint {cfg.checkpoint} holds NaN or infinite weights ({len(bad)} tensors, e.g. {bad[0]}); "
                        "export an earlier checkpoint of the run")
    card = model_card(model_name, state, _run_folder(cfg.checkpoint))  # a damaged eval.json fails here, before any write

    out = Path(cfg.out)
    claim = None
    if out.exists():  # the rule, checked before anything is written: empty, or an export of clip-ping's
        claim = claim_folder(out, "export", legacy=legacy_export_files)
        if claim.recorded and not cfg.overwrite:
            raise ConfigError(f"{out} already holds an exported model; pass --overwrite to replace it, or another --out")
    remove_killed_exports(out)
    temp = claim_folder(out.with_name(f".{out.name}{_TEMP_MARK}{os.getpid()}"), "export")
    try:
        _write_export(temp, model_name, portable_model_config(model_cfg), weights, card)
        verify_export(temp.folder)  # what open_clip loads is what was trained
        _move_into_place(temp, out, claim)
    except BaseException as exc:
        temp.clear()
        _remove_if_only_marker(temp.folder)
        if disk_full_cause(exc) is not None or isinstance(exc, DiskFull):
            raise DiskFull(f"the disk is full: cannot write the export next to {out}; nothing was left behind "
                           "(an earlier export there is unchanged); free some space and export again") from None
        raise
    return {"exported": str(out), "model": model_name,
            "load_with": f"open_clip.create_model_and_transforms('local-dir:{out}')"}


def _write_export(claim: FolderClaim, model_name: str, model_cfg: dict[str, Any], weights: dict[str, Any],
                  card: str) -> None:
    import open_clip
    from safetensors.torch import save

    image_size = model_cfg["vision_cfg"]["image_size"]
    preprocess_cfg = {
        "size": [image_size, image_size] if isinstance(image_size, int) else list(image_size),
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    safetensors, torch_bin, readme, config, bare = claim.files([*EXPORT_FILES, f"{model_name}.json"])
    atomic_write(safetensors, lambda f: f.write(save(weights)))
    atomic_torch_save(weights, torch_bin)
    atomic_write_json(bare, model_cfg)
    atomic_write_text(readme, card)
    # written last: its presence means a complete export
    atomic_write_json(config, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})


def _move_into_place(temp: FolderClaim, out: Path, claim: FolderClaim | None) -> None:
    """Put the finished export in ``temp`` at ``out``: one rename where ``out`` is absent or holds nothing but
    the export it replaces; file by file (each rename atomic) where the user keeps files of their own there."""
    if claim is not None:
        claim.clear()  # the export replaced (--overwrite): only the files clip-ping wrote
        _remove_if_only_marker(out)
    if not out.exists():
        os.rename(temp.folder, out)
        return
    claim = claim_folder(out, "export")
    for name in temp.recorded:
        claim.file(name)
        os.replace(temp.folder / name, out / name)
    temp.clear()
    _remove_if_only_marker(temp.folder)


def _remove_if_only_marker(folder: Path) -> None:
    """Remove ``folder`` when clip-ping's marker and lock are all it holds."""
    if folder.is_dir() and all(p.name in (MARKER, LOCK) for p in folder.iterdir()):
        for name in (MARKER, LOCK):
            (folder / name).unlink(missing_ok=True)
        folder.rmdir()


def remove_killed_exports(out: Path) -> None:
    """Remove the temporary folders that killed exports to ``out`` left (their marker says they are exports)."""
    parent = out.parent
    if not parent.is_dir():
        return
    for stale in parent.glob(f".{out.name}{_TEMP_MARK}*"):
        if not (stale / MARKER).is_file():
            continue
        pid = stale.name.rsplit(_TEMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another export at work
        try:
            claim_folder(stale, "export").clear()
        except DataError:
            continue
        _remove_if_only_marker(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def legacy_export_files(out: Path) -> list[str] | None:
    """The files of an export an earlier clip-ping wrote (None: not one): its open_clip_config.json and weights."""
    try:
        config = json.loads((out / "open_clip_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(config, dict) and "model_cfg" in config and (out / EXPORT_FILES[0]).is_file()):
        return None
    return [name for name in EXPORT_FILES if (out / name).is_file()] + \
        [p.name for p in out.glob("*.json") if p.name != "open_clip_config.json" and _is_model_config(p)]


def _is_model_config(path: Path) -> bool:
    try:
        return "vision_cfg" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


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
