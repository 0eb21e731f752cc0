"""The run folder of `clip-ping train`: one run per folder, continued or replaced only when asked.

A folder holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and the sinks'
folders, and clip-ping's marker (`clip_ping.io.claim_folder`). Another run is refused unless ``--resume`` or
``--overwrite``; a folder that is not a run is refused; the folder is locked while a run trains;
config.yaml records absolute paths so a run resumes from any directory.

A resumed run keeps the settings that shape its arithmetic (`RESUME_FIXED`: a
change is refused, naming the setting with its old and new value); the others
may change (`RESUME_MAY_CHANGE`, e.g. ``--steps`` to extend the run), and each
change is appended to ``run_history.jsonl`` with the step it took effect at.
config.yaml holds the settings in force, and says so when the history has entries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..config import option_changes
from ..errors import ConfigError, DataError
from ..hub.pretrained import is_remote
from ..io import FolderClaim, atomic_write_text, claim_folder
from .train_config import RESUME_FIXED, RESUME_INVOCATION, RESUME_MAY_CHANGE, TrainConfig, comparable_options

log = logging.getLogger(__name__)
HISTORY_FILE = "run_history.jsonl"

RUN_FILES = ("config.yaml", "metrics.jsonl", "run_history.jsonl")


def legacy_run_files(run: Path) -> list[str] | None:
    """The files of a run folder written before folders carried clip-ping's marker (None if ``run`` is not one):
    its config.yaml is a training config clip-ping wrote, beside its checkpoints or metrics."""
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


def _comparable(options: Mapping[str, Any]) -> dict[str, Any]:
    """Recorded options as compared on resume: paths resolved (checkpoints of older versions kept them as
    given), the lambdas of a method without NN/XNN terms left out (`comparable_options`)."""
    found = comparable_options(options)
    for key in ("data", "banks"):
        if found.get(key):
            found[key] = str(Path(found[key]).resolve())
    return found


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def settings_changed(recorded: Mapping[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded, now)}`` for the run's settings (not `RESUME_INVOCATION`) that ``cfg`` changes;
    keys a record of an older version lacks are not compared."""
    old, new = _comparable(recorded), _comparable(dataclasses.asdict(config_to_record(cfg)))
    return {k: (old[k], new[k]) for k in old if k in new and k not in RESUME_INVOCATION and old[k] != new[k]}


def resume_changes(recorded: Mapping[str, Any], cfg: TrainConfig, source: str) -> dict[str, tuple[Any, Any]]:
    """The settings this command changes in the run it resumes, ``{key: (old, new)}``.

    ``recorded`` is the config saved in the checkpoint (``source`` names it). A change of a setting
    in `RESUME_FIXED` is refused with one line naming each, its old and its new value; the changes
    returned are all of `RESUME_MAY_CHANGE`. Keys a checkpoint of an older version lacks are not compared.
    """
    unclassified = {f.name for f in dataclasses.fields(cfg)} - RESUME_FIXED - RESUME_MAY_CHANGE - RESUME_INVOCATION
    assert not unclassified, f"TrainConfig fields without a resume rule: {sorted(unclassified)}"
    differ = settings_changed(recorded, cfg)
    fixed = [k for k in differ if k in RESUME_FIXED]
    if fixed:
        changes = option_changes({k: v[0] for k, v in differ.items()}, {k: v[1] for k, v in differ.items()}, fixed)
        raise ConfigError(f"--resume: the run in {source} was trained with other settings ({changes}); a resumed run "
                          f"keeps the settings that shape its training: resume with --config {cfg.out}/config.yaml, "
                          "or start a new run in another --out")
    return {k: v for k, v in differ.items() if k in RESUME_MAY_CHANGE}


def record_settings(run: Path, cfg: TrainConfig, step: int, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Write config.yaml (the settings in force) and append this resume's changes, if any, to the history."""
    history = run / HISTORY_FILE
    if changes:
        entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "changed": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}}
        with open(history, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("resumed at step %d with %s (recorded in %s)", step,
                 ", ".join(f"{_flag(k)} {old} -> {new}" for k, (old, new) in changes.items()), history)
    header = (f"# the settings in force now; {HISTORY_FILE} lists the ones changed on resume, and the step "
              "each change took effect at\n") if history.is_file() else ""
    body = yaml.safe_dump(dataclasses.asdict(config_to_record(cfg)), sort_keys=False)
    atomic_write_text(run / "config.yaml", header + body)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps up to ``step`` (a resumed run trains the later ones again).

    A torn last line (the process died while writing it) is dropped with a warning; a line that is
    not JSON before the last is refused, naming the file and line (something else wrote there)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                log.warning("%s: its last line is cut short (a run stopped while writing it); dropped", path)
                continue
            raise DataError(f"{path} line {number} is not a JSON record; fix or remove that line to resume") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number} is not a JSON record; fix or remove that line to resume")
        if record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
