"""The run folder of `clip-ping train`: one run per folder, continued or replaced only when asked.

A folder holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and the sinks'
folders. Another run is refused unless ``--resume`` or ``--overwrite``;
config.yaml records absolute paths so a run resumes from any directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..hub.pretrained import is_remote
from ..io import atomic_write_text
from .train_config import TrainConfig


def run_folder_problem(cfg: TrainConfig, run: Path) -> str | None:
    """Why the run folder cannot take this run (None when it can); clears it for --overwrite."""
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"config key 'out': cannot create the run folder {run} ({exc.strerror})"
    if not os.access(run, os.W_OK):
        return f"config key 'out': the run folder {run} is not writable"
    if cfg.overwrite:
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(run / name, ignore_errors=True)
        for name in ("metrics.jsonl", "config.yaml", "eval.json"):
            (run / name).unlink(missing_ok=True)
        return None
    holds_run = (run / "config.yaml").is_file() or (run / "checkpoints").is_dir() or (run / "metrics.jsonl").is_file()
    if cfg.resume is None and holds_run:
        return (f"{run} already holds a run; continue it with --resume latest, replace it with --overwrite, "
                "or choose another --out")
    return None


def config_to_record(cfg: TrainConfig) -> TrainConfig:
    """The config as config.yaml records it: paths absolute, so resuming works from any directory."""
    absolute: dict[str, Any] = {key: str(Path(value).resolve()) for key in ("data", "out", "banks")
                if (value := getattr(cfg, key))}
    if cfg.init_from and not is_remote(cfg.init_from):
        local = cfg.init_from.removeprefix("local-dir:")
        absolute["init_from"] = cfg.init_from[: len(cfg.init_from) - len(local)] + str(Path(local).expanduser().resolve())
    return dataclasses.replace(cfg, **absolute)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps up to ``step`` (a resumed run trains the later ones again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
