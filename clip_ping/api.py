"""The Python API: each pipeline stage as a function, the same as its ``clip-ping`` command.

Every function takes its stage's config as a dataclass, a dict, or a YAML file
path, plus keyword overrides, and returns what the command prints::

    import clip_ping

    clip_ping.extract({"data": "data/synth/train.csv", "out": "data/synth/banks"})
    clip_ping.neighbors(banks="data/synth/banks", k=10)
    run = clip_ping.train("run.yaml", out="runs/ping", steps=500)
    scores = clip_ping.evaluate(checkpoint="runs/ping", data="data/synth")
    clip_ping.export(checkpoint="runs/ping", out="runs/ping-open_clip")

Configs are validated as on the command line (unknown keys are refused by
name), the installed versions are checked, and a stage that needs a missing
extra says which. Errors are `clip_ping.errors.ClipPingError`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

ConfigLike = Any  # a config dataclass, a dict, a YAML path, or None (the defaults)


def _run(command_path: tuple[str, ...], cfg: ConfigLike, overrides: dict[str, Any]) -> Any:
    from .cli import COMMANDS, _load
    from .config import from_dict, load_yaml, to_dict
    from .environment import check_environment, require

    command = next(c for c in COMMANDS if c.path == command_path)
    cls = _load(command.config)
    where = "arguments"
    if cfg is None:
        values: dict[str, Any] = {}
    elif isinstance(cfg, (str, Path)):
        values, where = load_yaml(cfg), str(cfg)
    elif isinstance(cfg, dict):
        values = dict(cfg)
    elif dataclasses.is_dataclass(cfg) and isinstance(cfg, cls):
        values = to_dict(cfg)
    else:
        from .errors import ConfigError

        raise ConfigError(f"{command_path[-1]}() takes a {cls.__name__}, a dict or a YAML path, not {type(cfg).__name__}")
    check_environment()
    for extra in command.needs:
        require(extra)
    return _load(command.run)(from_dict(cls, {**values, **overrides}, where))


def extract(cfg: ConfigLike = None, **overrides: Any) -> Any:
    """Stage 1: teacher feature banks (`clip_ping.banks.ExtractConfig`)."""
    return _run(("extract",), cfg, overrides)


def neighbors(cfg: ConfigLike = None, **overrides: Any) -> Any:
    """Neighbour tables next to the banks (`clip_ping.knn.NeighborsConfig`)."""
    return _run(("neighbors",), cfg, overrides)


def train(cfg: ConfigLike = None, **overrides: Any) -> dict[str, Any]:
    """Stage 2: train a student (`clip_ping.training.trainer.TrainConfig`); returns step, checkpoint, ..."""
    return _run(("train",), cfg, overrides)


def evaluate(cfg: ConfigLike = None, **overrides: Any) -> dict[str, Any]:
    """Zero-shot, retrieval, linear probe, or a ``suite`` (`clip_ping.evaluation.stage.EvalConfig`)."""
    return _run(("eval",), cfg, overrides)


def export(cfg: ConfigLike = None, **overrides: Any) -> dict[str, str]:
    """An open_clip / Hugging Face hub folder with a model card (`clip_ping.hub.export.ExportConfig`)."""
    return _run(("export",), cfg, overrides)
