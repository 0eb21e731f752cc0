"""Checkpoint files that are never half-written.

Each save writes to a temporary file in the same folder, fsyncs it and renames
it over the target (atomic on POSIX), so ``latest.pt`` is always a complete
checkpoint, whatever moment the process is killed at.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..io import atomic_link, atomic_torch_save, atomic_write_text, remove_stale_temporaries
from ..model.student import nonfinite_tensors  # noqa: F401  (re-exported: its name here before the student's check moved)

__all__ = ["atomic_torch_save", "atomic_write_text", "load_checkpoint", "resolve_resume", "save_checkpoint"]

_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def save_checkpoint(state: dict[str, Any], folder: Path, step: int, keep: int = 2) -> Path:
    """Write ``latest.pt`` and, with ``keep`` > 0, ``step_<step>.pt``, keeping the newest ``keep`` step files.

    Returns the path of the checkpoint of this step (``latest.pt`` when no step files are kept).
    """
    remove_stale_temporaries(folder) if folder.is_dir() else None  # left by a process killed mid-save
    step_path = folder / f"step_{step:07d}.pt"
    latest = folder / "latest.pt"
    if keep > 0:
        atomic_torch_save(state, step_path)
    # latest.pt is the step file under a second name: one write, not two
    if keep == 0 or not atomic_link(step_path, latest):
        atomic_torch_save(state, latest)
    step_files = sorted(folder.glob("step_*.pt"), key=lambda p: int(_STEP_FILE.search(p.name).group(1)))
    for old in step_files[:-keep] if keep > 0 else step_files:
        old.unlink(missing_ok=True)
    return step_path if keep > 0 else latest


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """``latest`` -> the run's latest checkpoint (None if the run has none yet); else a path."""
    if resume == "latest":
        latest = run_dir / "checkpoints" / "latest.pt"
        return latest if latest.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise DataError(f"checkpoint to resume from not found: {path}")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DataError(f"cannot read checkpoint {path}: {exc}") from None


def settings_that_differ(saved: dict[str, Any], cfg: Any) -> str:
    """'key: saved -> now' for the settings that shape an objective's state."""
    keys = [f.name for f in dataclasses.fields(cfg) if f.name not in
            ("out", "resume", "overwrite", "steps", "epochs", "workers", "threads", "progress", "tensorboard", "device",
             "log_every", "save_every", "keep_checkpoints", "prefetch_batches", "max_skipped_fraction", "data", "banks",
              "image_cache", "image_cache_gb")]
    return ", ".join(f"--{k.replace('_', '-')} {saved[k]} -> {getattr(cfg, k)}" for k in keys
                     if k in saved and saved[k] != getattr(cfg, k))


def objective_state_of_v1(state: dict[str, Any]) -> dict[str, Any]:
    """The objective state of a checkpoint written before objectives existed (heads, queue and memory at top level)."""
    if state.get("guidance") is None:
        return {}
    converted: dict[str, Any] = {f"heads.{k}": t for k, t in state["guidance"].items()}
    converted["_extra_state"] = {"source": state.get("queue"), "targets": state.get("student_memory")}
    return converted
