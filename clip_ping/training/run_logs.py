"""Where a training run's metrics go: ``--log-to jsonl,tensorboard,wandb``.

Each sink takes the same record (``{"step", "epoch", "loss", ...}``) every
``log_every`` steps:

- ``jsonl``: ``RUN/metrics.jsonl``, one JSON object per record (what `clip-ping report` reads);
- ``tensorboard``: event files under ``RUN/tensorboard`` (the ``tensorboard`` extra);
- ``wandb``: a Weights & Biases run (the ``wandb`` extra) named after the run,
  with the run's config; ``WANDB_MODE=offline`` keeps it on disk under
  ``RUN/wandb`` for a later ``wandb sync``, ``WANDB_PROJECT`` picks the project.

A sink whose package is missing stops the run before training starts, with a
line naming the extra to install.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..environment import require
from ..errors import ConfigError

SINKS = ("jsonl", "tensorboard", "wandb")


def parse_log_to(value: str | Sequence[str], tensorboard: bool = True) -> list[str]:
    """``"jsonl,wandb"`` or a list -> sink names, checked; ``"none"`` or empty: no sink.

    ``"auto"``: jsonl, plus tensorboard when it is installed. ``tensorboard=False``
    (the older ``--no-tensorboard`` switch) drops tensorboard whatever the list says.
    """
    if value == "auto":
        from ..environment import has_extra

        value = "jsonl,tensorboard" if has_extra("tensorboard") else "jsonl"
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip().lower() for n in names if n.strip() and n.strip().lower() != "none"]
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise ConfigError(f"config key 'log_to': unknown sink '{unknown[0]}' (known: {', '.join(SINKS)})")
    return [n for n in dict.fromkeys(names) if tensorboard or n != "tensorboard"]


class JsonlSink:
    def __init__(self, run_dir: Path) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a")

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a killed run keeps every record written so far

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, run_dir: Path) -> None:
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        require("wandb")
        import wandb

        # resume="allow" with a stable id: a resumed clip-ping run continues the same W&B run
        folder = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
        run_id = "".join(c if c.isalnum() else "-" for c in f"{run_name}-{folder}")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "clip-ping"), name=run_name, id=run_id,
                              resume="allow", config=config, dir=str(run_dir), reinit="finish_previous")

    def log(self, record: dict[str, Any]) -> None:
        values = {f"train/{k}": v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class RunLogs:
    """The chosen sinks of one run, fed together."""

    def __init__(self, run_dir: str | Path, log_to: str | Sequence[str], run_name: str,
                 config: dict[str, Any] | None = None, tensorboard: bool = True) -> None:
        run_dir = Path(run_dir)
        self.sinks: list[Any] = []
        try:
            for name in parse_log_to(log_to, tensorboard):
                if name == "jsonl":
                    self.sinks.append(JsonlSink(run_dir))
                elif name == "tensorboard":
                    self.sinks.append(TensorBoardSink(run_dir))
                else:
                    self.sinks.append(WandbSink(run_dir, run_name, config or {}))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
