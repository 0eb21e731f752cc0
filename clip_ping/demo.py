"""`clip-ping demo`: every stage on the built-in data, CLIP against CLIP-PING.

data synth -> extract -> neighbors -> train (clip and clip-ping, same data,
steps, student and seeds) -> eval -> report, whose index.html links the
neighbour page (`neighbors show`) written beside it. Each stage is skipped when
its output is already complete, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import Config, borrow, option
from .objectives import OBJECTIVES
from .report import NEIGHBOR_PAGE
from .trainer import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class DemoConfig(Config):
    out: str = option("runs/demo", "folder for the data, banks, runs and report")
    n_train: int = option(4000, "training pairs of the built-in data set")
    n_val: int = option(500, "validation pairs")
    n_test: int = option(1000, "test pairs (zero-shot and retrieval)")
    image_size: int = option(64, "image resolution of the built-in data set")
    data_seed: int = option(0, "seed of the built-in data set")
    seeds: list[int] = option([0, 1], "training seeds; every seed trains both methods")
    neighbor_k: int = option(10, "neighbours kept per sample")
    # passed on to every training run: help and defaults are TrainConfig's, but for the demo's length and
    # precision (bf16 autocast is ~3x faster than fp32 on CPUs with AMX)
    model: str = borrow(TrainConfig, "model")
    epochs: int = borrow(TrainConfig, "epochs", 6)
    batch_size: int = borrow(TrainConfig, "batch_size")
    lr: float = borrow(TrainConfig, "lr")
    lambda_nn: float | None = borrow(TrainConfig, "lambda_nn")
    lambda_xnn: float | None = borrow(TrainConfig, "lambda_xnn")
    precision: str = borrow(TrainConfig, "precision", "bf16")
    workers: int = borrow(TrainConfig, "workers")
    progress: bool = borrow(TrainConfig, "progress")


TRAIN_OPTIONS = ("model", "epochs", "batch_size", "lr", "lambda_nn", "lambda_xnn", "precision", "workers", "progress")


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    result = fn()
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 2)
    log.info("demo: %s done in %.1f s", name, time.perf_counter() - t0)
    return result


def run_demo(cfg: DemoConfig) -> None:
    from .banks import ExtractConfig, extract_banks
    from .data.synth import SynthConfig, generate_synthetic
    from .evaluation.stage import EvalConfig, evaluate_from_config
    from .knn import NeighborsConfig, build_neighbors
    from .report import build_report
    from .trainer import train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, bank_dir = out / "data", out / "data" / "banks"
    timings: dict[str, float] = {}

    synth_cfg = SynthConfig(out=str(data_dir), seed=cfg.data_seed, n_train=cfg.n_train, n_val=cfg.n_val,
                            n_test=cfg.n_test, image_size=cfg.image_size)
    _timed(timings, "data synth", lambda: generate_synthetic(synth_cfg))
    _timed(timings, "extract", lambda: extract_banks(ExtractConfig(data=str(data_dir / "train.csv"), out=str(bank_dir),
                                                                   workers=cfg.workers, progress=cfg.progress)))
    _timed(timings, "neighbors", lambda: build_neighbors(NeighborsConfig(banks=str(bank_dir), k=cfg.neighbor_k)))

    run_dirs = []
    for seed in cfg.seeds:
        for method in ("clip", "clip-ping"):
            run_dir = out / "runs" / f"{method}-seed{seed}"
            run_dirs.append(run_dir)
            if (run_dir / "eval.json").is_file():
                log.info("demo: %s already trained and evaluated, skipped", run_dir)
                continue
            options = {k: getattr(cfg, k) for k in TRAIN_OPTIONS
                       if OBJECTIVES[method].weighs_neighbor_terms or not k.startswith("lambda_")}
            train_cfg = TrainConfig(data=str(data_dir), banks=str(bank_dir), out=str(run_dir), method=method,
                                    seed=seed, resume="auto", tensorboard=False, **options)
            _timed(timings, f"train {method}", lambda: train(train_cfg))
            eval_cfg = EvalConfig(checkpoint=str(run_dir), data=str(data_dir), split="test",
                                  out=str(run_dir / "eval.json"), workers=cfg.workers)
            _timed(timings, f"eval {method}", lambda: evaluate_from_config(eval_cfg))

    report_dir = out / "report"
    _timed(timings, "neighbour page", lambda: write_demo_neighbor_page(data_dir, bank_dir, report_dir))
    _timed(timings, "report", lambda: build_report(run_dirs, report_dir))
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    table = (report_dir / "report.md").read_text()
    print(table)
    print(f"\nstage times (s): {json.dumps(timings)}")
    print(f"report: {report_dir / 'index.html'} (neighbour page: {report_dir / NEIGHBOR_PAGE})")


def write_demo_neighbor_page(data_dir: Path, bank_dir: Path, report_dir: Path) -> dict[str, Any]:
    """The neighbour page, self-contained (embedded thumbnails), in the report folder that links it.

    In the report folder rather than the bank's, so the report and its neighbour page move together.
    """
    from .knn import ShowConfig, show_neighbors

    return show_neighbors(ShowConfig(data=str(data_dir), banks=str(bank_dir), out=str(report_dir / NEIGHBOR_PAGE)))
