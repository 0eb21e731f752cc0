"""The run folder of `clip-ping train`: one run per folder, continued or replaced only when asked.

A folder holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and the sinks'
folders, and clip-ping's marker (`clip_ping.io.claim_folder`). Another run is refused unless ``--resume`` or
``--overwrite``; a folder that is not a run is refused; the folder is locked while a run trains;
config.yaml records absolute paths so a run resumes from any directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..hub.pretrained import is_remote
from ..io import FolderClaim, atomic_write_text, claim_folder
from .train_config import TrainConfig

RUN_FILES = ("config.yaml", "metrics.jsonl")


def legacy_run_files(run: Path) -> list[str] | None:
    """The files of a run folder written before folders carried clip-ping's marker (None if ``run`` is not one):
    its config.yaml is a training config clip-ping wrote, beside its checkpoints or metrics."""
    import yaml

    try:
        recorded = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    if not (isinstance(recorded, dict) and {"method", "model", "out", "seed"} <= set(recorded) <= keys):
        return None
    checkpoints = run / "checkpoints"
    files = [name for name in RUN_FILES if (run / name).is_file()]
    files += [f"checkpoints/{p.name}" for p in sorted(checkpoints.glob("*.pt"))
              if p.name == "latest.pt" or p.name.startswith("step_")]
    if files == ["config.yaml"]:
        return None  # a config.yaml alone: perhaps a copy, not a run
    files += [f"{name}/" for name in ("tensorboard", "wandb") if (run / name).is_dir()]
    return files


def legacy_eval_files(folder: Path) -> list[str] | None:
    """The evaluation results an earlier clip-ping wrote in a run folder (eval.json and suite.json, with the
    suite's table), recognised by the checkpoint they name."""
    found = []
    for name in ("eval.json", "suite.json"):
        try:
            result = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(result, dict) and "checkpoint" in result:
            found.append(name)
            if name == "suite.json" and (folder / "suite.md").is_file():
                found.append("suite.md")
    return found or None


def claim_run_folder(cfg: TrainConfig, run: Path) -> FolderClaim:
    """Claim and lock the run folder for this run; refuses (one line) a folder of another run unless
    ``--resume``, and one that is not a run at all. ``--overwrite`` removes only the run's own files."""
    claim = claim_folder(run, "run", overwrite=cfg.overwrite, legacy=legacy_run_files, lock=True)
    try:
        if cfg.overwrite:  # the evaluation of the run replaced goes with it
            claim_folder(run, "evaluation", legacy=legacy_eval_files, any_folder=True).clear()
        elif cfg.resume is None and claim.recorded:
            raise ConfigError(f"{run} already holds a run; continue it with --resume latest, replace it with "
                              "--overwrite, or choose another --out")
    except BaseException:
        claim.release()
        raise
    return claim


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
