"""Run folders for `clip-ping report`: read each (config.yaml, metrics.jsonl, eval.json) and group them
into settings, where runs whose configs differ only in the seed and bookkeeping are seeds of one setting.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import ConfigError, DataError
from ..training.train_config import comparable_options

log = logging.getLogger(__name__)

# Config keys that do not change what a run computes: runs differing only here are seeds of one setting.
BOOKKEEPING_KEYS = {"seed", "out", "resume", "workers", "progress", "tensorboard", "log_to", "run_name", "device",
                    "log_every", "save_every", "keep_checkpoints"}

# --------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]      # training log records, one per step, by step
    eval: dict[str, Any] | None

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


def _read_history(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records by step; after a resume a step may repeat, and the last record wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON, skipped", path, line_no)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def load_run(path: str | Path) -> Run:
    """Read one run folder; any of its three files may be missing, but not all."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"run folder not found: {path}")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{path / 'config.yaml'} is not valid YAML: {str(exc).splitlines()[0]}") from None
    history = _read_history(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    evaluation = None
    if (path / "eval.json").is_file():
        try:
            evaluation = json.loads((path / "eval.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path / 'eval.json'} is not valid JSON: {exc}") from None
    if not config and not history and evaluation is None:
        raise DataError(f"{path} is not a run folder (no config.yaml, metrics.jsonl or eval.json)")
    if evaluation is None:
        log.warning("%s has no eval.json; run `clip-ping eval --checkpoint %s` for its metrics", path, path)
    return Run(path, config if isinstance(config, dict) else {}, history, evaluation)


# --------------------------------------------------------------------------- settings


@dataclass
class Setting:
    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]


def setting_config(run: Run) -> dict[str, Any]:
    """The options that define what the run computed (what makes two runs seeds of one setting)."""
    return comparable_options({k: v for k, v in run.config.items() if k not in BOOKKEEPING_KEYS})


def _folder_setting_name(path: Path) -> str:
    # "clip-seed1" -> "clip": a run without a config is grouped by its folder name minus the seed
    return re.sub(r"[-_.]?seed[-_]?\d+$", "", path.name) or path.name


def group_runs(runs: Sequence[Run], names: Sequence[str] | None = None) -> list[Setting]:
    """Settings in order of first appearance; ``names`` (one per run) override the grouping."""
    if names:
        if len(names) != len(runs):
            raise ConfigError(f"config key 'names': {len(names)} names for {len(runs)} run folders (give one per run)")
        keys = list(names)
    else:
        keys = [json.dumps(setting_config(r), sort_keys=True, default=str) if r.config
                else "folder:" + _folder_setting_name(r.path) for r in runs]
    groups: dict[str, list[Run]] = {}
    for key, run in zip(keys, runs):
        groups.setdefault(key, []).append(run)
    if not names:
        # Same config *and* same seed is not a second seed: keep such runs apart.
        for key in list(groups):
            seeds = [r.seed for r in groups[key]]
            if len(set(map(str, seeds))) < len(seeds):
                log.warning("runs %s share config and seed; reported separately",
                            ", ".join(str(r.path) for r in groups[key]))
                for run in groups.pop(key):
                    groups[f"{key}|{run.path}"] = [run]
    if names:
        return [Setting(key, members) for key, members in groups.items()]
    labels = _setting_labels([members[0] for members in groups.values()])
    return [Setting(label, members) for label, members in zip(labels, groups.values())]


def _setting_labels(representatives: Sequence[Run]) -> list[str]:
    """Short names: the method, plus the config keys whose values differ between settings."""
    configs = [setting_config(r) for r in representatives]
    all_keys = sorted(set().union(*configs)) if configs else []
    # A key missing from a config (e.g. the lambdas of plain CLIP) does not make it differ.
    differing = [k for k in all_keys if k != "method"
                 and len({json.dumps(c[k], default=str) for c in configs if k in c}) > 1]
    labels = []
    for run, config in zip(representatives, configs):
        if not config:
            labels.append(_folder_setting_name(run.path))
            continue
        parts = [str(config["method"])] if "method" in config else []
        parts += [f"{k}={config[k]}" for k in differing if k in config]
        labels.append(" ".join(parts) or _folder_setting_name(run.path))
    # Still ambiguous (e.g. same config, different folders): add the folder name.
    ambiguous = {label for label in labels if labels.count(label) > 1}
    return [f"{label} ({run.path.name})" if label in ambiguous else label
            for label, run in zip(labels, representatives)]
