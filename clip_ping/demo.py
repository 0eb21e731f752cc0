"""`clip-ping demo`: every stage on the built-in data, CLIP against CLIP-PING.

data synth -> extract -> neighbors -> train (clip and clip-ping, same data,
steps, student and seeds) -> eval -> report, whose index.html links the
neighbour page (`neighbors show`) written beside it. Each stage is skipped when
its output is already complete, so an interrupted demo picks up where it stopped;
``OUT/demo.json`` records the options the folder's work was made with, and a demo
with other options is refused (naming them) rather than shown the old results.

The teachers extract with every core; then, on a CPU, the training runs go two
at a time, each in a process with half the cores (``--jobs``; the processes start
while the teachers load, and import the training code meanwhile). On 2 cores two
1-thread trainings do 1.25x the work of one 2-thread training (the student's
small kernels scale poorly over threads), so side by side wins there
(BENCHMARKS.md, "The demo's runs side by side"). The CLIP-PING runs, whose steps
do more, go first, so the processes finish together. With a GPU the runs take
turns on it (``--jobs 1``).

The image teacher sees the 64 px pictures at 96 px, not at its own 224 px: 3.5x
less extraction, and CLIP-PING's results stay within the seed spread of the
224 px bank's (BENCHMARKS.md, "The teacher's input size in the demo").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import Config, borrow, option, option_changes
from .errors import ConfigError
from .io import atomic_write_text, claim_folder
from .objectives import OBJECTIVES
from .report.build import NEIGHBOR_PAGE
from .training.trainer import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class DemoConfig(Config):
    out: str = option("runs/demo", "folder for the data, banks, runs and report")
    n_train: int = option(4000, "training pairs of the built-in data set", bounds=">= 1")
    n_val: int = option(500, "validation pairs", bounds=">= 0")
    n_test: int = option(1000, "test pairs (zero-shot and retrieval)", bounds=">= 1")
    image_size: int = option(64, "image resolution of the built-in data set", bounds="[16, 4096]")
    data_seed: int = option(0, "seed of the built-in data set", bounds="[0, 4294967295]")
    seeds: list[int] = option([0, 1], "training seeds; every seed trains both methods", bounds="[0, 4294967295]")
    neighbor_k: int = option(10, "neighbours kept per sample", bounds=">= 1")
    teacher_image_size: int = option(96, "side in pixels the image teacher sees; the built-in images are 64 px "
                                     "(224, EfficientNet-Lite0's own, extracts 3.5x slower for results within "
                                     "the seed spread)", bounds="[16, 2048]")
    jobs: int | None = option(None, "training runs side by side, each in a process with its share of the cores "
                                    "(default: 2 on a CPU with 2 or more cores, 1 with a GPU); the teachers "
                                    "extract before them, with every core", bounds=">= 1")
    # passed on to every training run: help and defaults are TrainConfig's, but for the demo's length
    model: str = borrow(TrainConfig, "model")
    epochs: int = borrow(TrainConfig, "epochs", 6)
    batch_size: int = borrow(TrainConfig, "batch_size")
    lr: float = borrow(TrainConfig, "lr")
    lambda_nn: float | None = borrow(TrainConfig, "lambda_nn")
    lambda_xnn: float | None = borrow(TrainConfig, "lambda_xnn")
    # bf16 autocast is ~2x faster than fp32 on CPUs with AMX, and ~70x slower on CPUs without native bf16
    precision: str = option("auto", "auto (bf16 where the device computes bf16 natively, else fp32), fp32, bf16 or fp16",
                            choices=("auto", "fp32", "bf16", "fp16"))
    workers: int = borrow(TrainConfig, "workers")
    progress: bool = borrow(TrainConfig, "progress")

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("config key 'seeds': give at least one training seed")


RECORD = "demo.json"
# options that decide no result: how fast and how verbosely the demo runs
NOT_RECORDED = ("out", "jobs", "workers", "progress")


def check_demo_folder(cfg: DemoConfig) -> None:
    """Claim the folder for the demo; refuse one holding a demo made with other options, else record this
    demo's options in it."""
    out = Path(cfg.out)
    claim_folder(out, "demo", legacy=_legacy_demo_files).files(["timings.json", RECORD])
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RECORDED}
    path = out / RECORD
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))["options"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise ConfigError(f"{path} is not a demo record; choose another --out") from None
        changes = option_changes(recorded, options, [k for k in options if k in recorded])
        if changes:
            raise ConfigError(f"{out} holds a demo made with other options ({changes}); its results are not "
                              "these options': choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"options": options}, indent=2) + "\n", encoding="utf-8")


TRAIN_OPTIONS = ("model", "epochs", "batch_size", "lr", "lambda_nn", "lambda_xnn", "precision", "workers", "progress")


def train_precision(asked: str, device: str) -> str:
    """The precision the demo trains in: ``auto`` is bf16 where ``device`` computes bf16 natively, else fp32."""
    from .distributed import native_bf16, resolve_device

    if asked != "auto":
        return asked
    return "bf16" if native_bf16(resolve_device(device)) else "fp32"


def demo_jobs(asked: int | None, device: str) -> int:
    """Processes side by side: as asked, else 2 on a CPU with 2 or more cores and 1 on a GPU (the runs take turns)."""
    from .distributed import resolve_device

    if asked is not None:
        return asked
    return 2 if resolve_device(device).type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def demo_run_config(cfg: DemoConfig, method: str, seed: int, data_dir: Path, bank_dir: Path, run_dir: Path,
                    precision: str, workers: int, progress: bool) -> TrainConfig:
    """One of the demo's training runs: the demo's options (the lambdas only for methods that weigh them)."""
    options = {k: getattr(cfg, k) for k in TRAIN_OPTIONS
               if OBJECTIVES[method].weighs_neighbor_terms or not k.startswith("lambda_")}
    options.update(precision=precision, workers=workers, progress=progress)
    return TrainConfig(data=str(data_dir), banks=str(bank_dir), out=str(run_dir), method=method, seed=seed,
                       resume="auto", tensorboard=False, **options)


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    result = fn()
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 2)
    log.info("demo: %s done in %.1f s", name, time.perf_counter() - t0)
    return result


def _prepare_banks(data_dir: Path, bank_dir: Path, cfg: DemoConfig, workers: int, progress: bool) -> dict[str, float]:
    """Teachers' banks and neighbour tables (what the CLIP-PING runs need)."""
    from .banks.extract import ExtractConfig, extract_banks
    from .knn import NeighborsConfig, build_neighbors

    timings: dict[str, float] = {}
    _timed(timings, "extract", lambda: extract_banks(ExtractConfig(data=str(data_dir / "train.csv"), out=str(bank_dir),
                                                                   teacher_image_size=cfg.teacher_image_size,
                                                                   workers=workers, progress=progress)))
    _timed(timings, "neighbors", lambda: build_neighbors(NeighborsConfig(banks=str(bank_dir), k=cfg.neighbor_k,
                                                                         progress=progress)))
    return timings


def train_and_evaluate(train_cfg: TrainConfig, data_dir: Path, workers: int) -> dict[str, float]:
    """One run: train, then evaluate on the test split (skipped when its eval.json exists)."""
    from .evaluation.stage import EvalConfig, evaluate_from_config
    from .training.trainer import train

    timings: dict[str, float] = {}
    run_dir = Path(train_cfg.out)
    if (run_dir / "eval.json").is_file():
        _check_finished_run(run_dir, train_cfg)
        log.info("demo: %s already trained and evaluated, skipped", run_dir)
        return timings
    summary = _timed(timings, f"train {train_cfg.method}", lambda: train(train_cfg))
    if summary.get("stopped_by"):
        # not evaluated: an eval.json would mark the run finished, and the next demo would skip it half-trained
        raise KeyboardInterrupt(f"{run_dir} stopped by {summary['stopped_by']} at step {summary['step']}; "
                                "run the demo again to resume it")
    # evaluated in fp32 whatever the training precision: bf16 features tie, and retrieval fell by up to 1.65 points
    eval_cfg = EvalConfig(checkpoint=str(run_dir), data=str(data_dir), split="test", out=str(run_dir / "eval.json"),
                          workers=workers, progress=train_cfg.progress, precision="fp32")
    _timed(timings, f"eval {train_cfg.method}", lambda: evaluate_from_config(eval_cfg))
    return timings


def _check_finished_run(run_dir: Path, train_cfg: TrainConfig) -> None:
    """A finished run is reused only when it was trained as this demo would train it (a demo folder
    older than demo.json has only the runs' own config.yaml to say so)."""
    import yaml

    from .training.run_folder import settings_changed
    from .training.train_config import RESUME_FIXED

    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        recorded = None
    if not isinstance(recorded, dict):
        raise ConfigError(f"{run_dir} holds an evaluated run without a readable config.yaml; choose another --out")
    differ = settings_changed(recorded, train_cfg)
    keys = [k for k in differ if k in RESUME_FIXED or k in ("epochs", "steps")]
    if keys:
        changes = option_changes({k: v[0] for k, v in differ.items()}, {k: v[1] for k, v in differ.items()}, keys)
        raise ConfigError(f"{run_dir} holds a finished run of other settings ({changes}); its results are not "
                          "this demo's: choose another --out")


def _in_worker(threads: int, fn: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
    """Run ``fn`` in a pool process with ``threads`` torch threads, logging as the parent does."""
    import torch

    torch.set_num_threads(threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops a run as in one process
    try:
        return fn(*args)
    finally:
        signal.signal(signal.SIGINT, previous)


def _legacy_demo_files(out: Path) -> list[str] | None:
    """The demo's own file in a demo folder an earlier clip-ping wrote (None: not one). Its data, banks, runs and
    report carry their own records (or are recognised each by its own command)."""
    if not ((out / "data" / "dataset.json").is_file() and (out / "runs").is_dir()):
        return None
    return ["timings.json"] if (out / "timings.json").is_file() else []


def run_demo(cfg: DemoConfig) -> None:
    from .data.synth import SynthConfig, generate_synthetic
    from .report.build import build_report

    out = Path(cfg.out)
    check_demo_folder(cfg)
    data_dir, bank_dir = out / "data", out / "data" / "banks"
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    jobs = demo_jobs(cfg.jobs, TrainConfig.device)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # side by side, a run's loader workers come out of its own share of the cores: with one core
    # each, a worker would preempt the training thread, so the loader runs in the training process
    run_workers = cfg.workers if jobs == 1 else min(cfg.workers, threads - 1)

    synth_cfg = SynthConfig(out=str(data_dir), seed=cfg.data_seed, n_train=cfg.n_train, n_val=cfg.n_val,
                            n_test=cfg.n_test, image_size=cfg.image_size)
    _timed(timings, "data synth", lambda: generate_synthetic(synth_cfg))

    precision = train_precision(cfg.precision, TrainConfig.device)
    log.info("demo: training precision %s (asked: %s)", precision, cfg.precision)
    run_progress = cfg.progress and jobs == 1  # bars of side-by-side processes would overwrite each other
    runs = [demo_run_config(cfg, method, seed, data_dir, bank_dir, out / "runs" / f"{method}-seed{seed}", precision,
                            run_workers, run_progress)
            for seed in cfg.seeds for method in ("clip", "clip-ping")]

    # the longer runs first (CLIP-PING's step does more), so processes side by side finish at about the same time
    longest_first = sorted(runs, key=lambda c: not OBJECTIVES[c.method].weighs_neighbor_terms)
    if jobs == 1:
        _add(timings, _prepare_banks(data_dir, bank_dir, cfg, cfg.workers, cfg.progress))
        for train_cfg in longest_first:
            _add(timings, train_and_evaluate(train_cfg, data_dir, run_workers))
    else:
        # the side-by-side processes start now and import the training code while the teachers load
        # (single-threaded) and extract; the teachers go first, with every core: in a side-by-side process
        # of one core, extraction took 35.5 s against about 25 s, and the other process then trained alone
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_process) as pool:
            for _ in range(jobs):
                pool.submit(int)  # processes start on demand: one task each starts them all
            _add(timings, _prepare_banks(data_dir, bank_dir, cfg, cfg.workers, cfg.progress))
            _train_side_by_side(pool, jobs, longest_first, threads, run_workers, data_dir, timings, cfg.progress)

    report_dir = out / "report"
    _timed(timings, "neighbour page", lambda: write_demo_neighbor_page(data_dir, bank_dir, report_dir))
    _timed(timings, "report", lambda: build_report([Path(c.out) for c in runs], report_dir))
    timings["total (wall)"] = round(time.perf_counter() - t_start, 1)
    atomic_write_text(out / "timings.json", json.dumps(timings, indent=2))
    table = (report_dir / "report.md").read_text()
    print(table)
    print(f"\nstage times (s; side by side they overlap, so the total is less than their sum): {json.dumps(timings)}")
    print(f"report: {report_dir / 'index.html'} (neighbour page: {report_dir / NEIGHBOR_PAGE})")


def _add(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] = round(total.get(key, 0.0) + value, 2)


def _start_process() -> None:
    """A side-by-side process's start: the modules its runs need, imported before the first run is handed out.

    While it waits for a run, Ctrl-C is the demo's to handle (it shuts the processes down); during a
    run `_in_worker` gives it back to the run.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .evaluation import stage  # noqa: F401
    from .training import trainer  # noqa: F401

    try:
        import sklearn.linear_model  # noqa: F401  (the linear probe; an optional extra)
    except ImportError:
        pass


def _train_side_by_side(pool: ProcessPoolExecutor, jobs: int, runs: list[TrainConfig], threads: int, workers: int,
                        data_dir: Path, timings: dict[str, float], progress: bool) -> None:
    """The runs (each trained, then evaluated) in the ``jobs`` processes of ``pool``, ``threads`` torch threads each.

    The processes' own bars would overwrite each other, so one bar here counts the finished runs.
    """
    from tqdm.auto import tqdm

    log.info("demo: %d runs in %d processes side by side, %d torch thread(s) and %d loader worker(s) each",
             len(runs), jobs, threads, workers)
    waiting = list(runs)
    with tqdm(total=len(runs), desc="demo: runs", unit="run", disable=not progress) as bar:
        # a run is handed over only when a process is free, so after a failed or stopped run (Ctrl-C reaches
        # every process) no new one starts: leaving the block waits for the runs in progress to save and stop
        def hand_over_next() -> Future:
            return pool.submit(_in_worker, threads, train_and_evaluate, waiting.pop(0), data_dir, workers)

        running = {hand_over_next() for _ in range(min(jobs, len(waiting)))}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                _add(timings, future.result())  # a failed or stopped run raises here, with its own error
                bar.update()
                if waiting:
                    running.add(hand_over_next())


def write_demo_neighbor_page(data_dir: Path, bank_dir: Path, report_dir: Path) -> dict[str, Any]:
    """The neighbour page, self-contained (embedded thumbnails), in the report folder that links it.

    In the report folder rather than the bank's, so the report and its neighbour page move together.
    """
    from .knn import ShowConfig, show_neighbors

    return show_neighbors(ShowConfig(data=str(data_dir), banks=str(bank_dir), out=str(report_dir / NEIGHBOR_PAGE)))
