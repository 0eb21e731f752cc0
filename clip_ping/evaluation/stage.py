"""The `clip-ping eval` stage: its config, and the entry that loads a checkpoint, scores it and writes the JSON.

The scoring itself is `runner.evaluate` (a data set folder) or `suite.run_suite` (a suite file).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, option
from ..errors import ConfigError, DataError
from ..io import atomic_write_json, atomic_write_text, claim_files
from ..teachers import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER
from ..teachers.base import autocast
from ..training.run_folder import legacy_eval_files
from .linear_probe import DEFAULT_CS
from .runner import evaluate, evaluate_teachers
from .suite import run_suite, suite_markdown
from .suite_file import read_suite
from .tasks import read_tasks_file, read_templates_file

log = logging.getLogger(__name__)


@dataclass
class EvalConfig(Config):
    checkpoint: str = option("runs/train", "checkpoint file, run folder (its latest checkpoint) or exported open_clip folder")
    data: str = option("data/synth", "data set folder (train/val/test tables, optional dataset.json), or an image "
                                     "folder with one sub-folder per class (optionally under train/ val/ test/)")
    split: str = option("test", "split scored by zero-shot and retrieval (and the probe's test split)")
    out: str | None = option(None, "results JSON (default: eval.json in the run folder, or next to the checkpoint)")
    batch_size: int = option(256, "images or captions encoded at once", bounds=">= 1")
    workers: int = option(2, "data loader worker processes for image decoding", bounds=">= 0")
    linear_probe: bool = option(True, "also fit a linear probe per task (train split features, C chosen on val)")
    probe_max_train: int | None = option(2000, "train images used by the linear probe, sub-sampled at random (none: all)", bounds=">= 2")
    probe_cs: list[float] = option(list(DEFAULT_CS), "inverse regularisation strengths C tried by the linear probe", bounds="> 0")
    tasks_file: str | None = option(None, "JSON/YAML file of zero-shot tasks in dataset.json's format (replaces its tasks)")
    templates_file: str | None = option(None, "text file of prompt templates, one per line with {} (used for every task)")
    names_file: str | None = option(None, "image-folder data: JSON or text file mapping folder names to class names")
    suite: str | None = option(None, "YAML list of tasks on the field's layouts (class folders, Karpathy JSON, "
                                     "clip_benchmark WebDataset, data folders); writes one table (replaces --data)")
    with_clip_benchmark: bool = option(False, "with --suite: also run clip_benchmark's zero-shot classification and "
                                              "retrieval on the exported model (the clip-benchmark extra)")
    teacher_reference: bool = option(False, "also score the frozen teacher pair as a reference (under teacher_reference)")
    image_teacher: str = option(DEFAULT_IMAGE_TEACHER, "image teacher of the reference (name or spec, see clip_ping.teachers)")
    text_teacher: str = option(DEFAULT_TEXT_TEACHER, "text teacher of the reference; zero-shot and retrieval need "
                                                     "the same open_clip:<model>:<weights> spec as the image teacher")
    seed: int = option(0, "seed of the linear probe's train sub-sample", bounds="[0, 4294967295]")
    precision: str = option("fp32", "precision of the model's forward passes: fp32, or bf16 (torch.autocast, as "
                                    "open_clip_train evaluates a bf16 run; 1.5x faster on a CPU with AMX, but the "
                                    "features are rounded to bf16: their similarities tie, and retrieval R@k fell by "
                                    "up to 1.65 points on 1,000 pairs)", choices=("fp32", "bf16"))
    device: str = option("auto", "torch device: auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:N")
    progress: bool = option(True, "show progress bars")

    def validate(self) -> None:
        if self.with_clip_benchmark and not self.suite:
            raise ConfigError("config key 'with_clip_benchmark' needs 'suite' (the tasks clip_benchmark runs)")
        if not self.probe_cs:
            raise ConfigError("config key 'probe_cs' must list positive numbers")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"config key 'precision': {self.precision!r} is not one of fp32, bf16")


def default_output_path(checkpoint: str | Path) -> Path:
    """eval.json in the run folder: ``RUN/`` or ``RUN/checkpoints/x.pt`` -> ``RUN/eval.json``."""
    path = Path(checkpoint)
    if path.is_dir():
        return path / "eval.json"
    if path.parent.name == "checkpoints":
        return path.parent.parent / "eval.json"
    return path.with_name(f"{path.stem}.eval.json")


def evaluate_from_config(cfg: EvalConfig) -> dict[str, Any]:
    """Load the checkpoint, evaluate it, write the JSON; returns the results."""
    from dataclasses import replace

    from ..distributed import resolve_device

    cfg = replace(cfg, device=str(resolve_device(cfg.device)))
    from ..model.student import load_student  # imported here so the metrics do not need the student module

    if cfg.suite:
        return _suite_from_config(cfg)
    tasks = read_tasks_file(cfg.tasks_file) if cfg.tasks_file else None
    templates = read_templates_file(cfg.templates_file) if cfg.templates_file else None
    if not Path(cfg.data).is_dir():
        raise DataError(f"data set folder not found: {cfg.data}")
    out = Path(cfg.out) if cfg.out else default_output_path(cfg.checkpoint)
    claim_files(out.parent, "evaluation", [out.name], legacy=legacy_eval_files)  # before the long part
    if cfg.teacher_reference:  # loaded first: a wrong teacher name fails before the long student pass
        from ..teachers import load_image_teacher, load_text_teacher

        teachers = load_image_teacher(cfg.image_teacher, cfg.device), load_text_teacher(cfg.text_teacher, cfg.device)
    model, tokenizer, preprocess = load_student(cfg.checkpoint)
    model.to(cfg.device)
    common: dict[str, Any] = dict(batch_size=cfg.batch_size, workers=cfg.workers, tasks=tasks, templates=templates,
                  names_file=cfg.names_file, probe_max_train=cfg.probe_max_train, probe_cs=cfg.probe_cs,
                  seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    with autocast(cfg.device, cfg.precision):
        result = evaluate(model, tokenizer, preprocess, cfg.data, cfg.split, linear_probe=cfg.linear_probe, **common)
    result["checkpoint"] = str(cfg.checkpoint)
    result["precision"] = cfg.precision
    if cfg.teacher_reference:
        result["teacher_reference"] = evaluate_teachers(*teachers, cfg.data, cfg.split, **common)
    atomic_write_json(out, result)
    log.info("evaluation written to %s", out)
    return result


def _suite_from_config(cfg: EvalConfig) -> dict[str, Any]:
    """``--suite``: run every task of the file; writes the JSON and a markdown table beside it."""
    from ..model.student import load_student

    if not cfg.suite:
        raise ConfigError("config key 'suite': the suite file to run is required here")
    tasks = read_suite(cfg.suite)  # a mistake in the file fails before the model loads
    out = Path(cfg.out) if cfg.out else default_output_path(cfg.checkpoint).with_name("suite.json")
    claim_files(out.parent, "evaluation", [out.name, out.with_suffix(".md").name], legacy=legacy_eval_files)
    checkpoint = Path(cfg.checkpoint)
    if cfg.with_clip_benchmark and not (checkpoint / "open_clip_config.json").is_file():
        # clip_benchmark scores the exported model (as open_clip loads it); so does clip-ping, for a like comparison
        from ..environment import require
        from ..hub.export import ExportConfig, export_open_clip

        require("clip-benchmark")
        checkpoint = out.with_name(out.stem + "-export")
        # the folder is this command's own (replaced each time): only an export clip-ping wrote is replaced
        export_open_clip(ExportConfig(checkpoint=cfg.checkpoint, out=str(checkpoint), overwrite=True))
    model, tokenizer, preprocess = load_student(checkpoint)
    model.to(cfg.device)
    with autocast(cfg.device, cfg.precision):
        result = run_suite(model, tokenizer, preprocess, tasks, batch_size=cfg.batch_size, workers=cfg.workers,
                           device=cfg.device, progress=cfg.progress, probe_max_train=cfg.probe_max_train,
                           probe_cs=cfg.probe_cs, seed=cfg.seed, with_clip_benchmark=cfg.with_clip_benchmark)
    result = {"checkpoint": str(cfg.checkpoint), "model": str(checkpoint), "suite": str(cfg.suite),
              "precision": cfg.precision, **result}
    atomic_write_json(out, result)
    table = suite_markdown(result["table"])
    atomic_write_text(out.with_suffix(".md"), table)
    log.info("suite results written to %s and %s", out, out.with_suffix(".md"))
    print(table)
    return {"results": str(out), "table": str(out.with_suffix(".md"))}
