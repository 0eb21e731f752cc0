"""Quality benchmark, part 3 of 5: each stage in its own process, and each run under a lock.

A stage (data, extract, neighbors, run) runs as ``quality.py --stage-worker SPEC`` so that its
wall time and peak memory are its own; SIGTERM and SIGINT reach it. Several invocations may
share one ``--out``: a run is taken by the one that holds its lock (released by the system
if its holder dies), and a run folder trained with other options is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from quality_plan import BenchError, STAGE_TIMINGS, _comparable  # noqa: E402


def _rss_mb() -> dict[str, float]:
    """Peak resident memory so far: this process, and its largest finished child (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_rss_children_mb": round(children, 1)}


def _cpu_s() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _checkpoint_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest.pt"
    if not latest.is_file():
        return 0
    from clip_ping.training.checkpoints import load_checkpoint

    return int(load_checkpoint(latest).get("step", 0))


def _worker_run(p: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) one run, then evaluate it on val and test; eval.json is written last."""
    from clip_ping.evaluation.stage import EvalConfig, evaluate_from_config
    from clip_ping.training.trainer import TrainConfig, train

    run_dir = Path(p["train"]["out"])
    timing_path = run_dir / STAGE_TIMINGS
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    cfg = TrainConfig(**p["train"])
    start = _checkpoint_step(run_dir)
    t0, c0 = time.perf_counter(), _cpu_s()
    summary = train(cfg)
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - c0
    done = int(summary["step"]) - start
    if done > 0:  # time only steps trained now (a resumed, finished run adds nothing)
        timing["train_seconds"] = round(timing.get("train_seconds", 0.0) + seconds, 2)
        timing["train_cpu_seconds"] = round(timing.get("train_cpu_seconds", 0.0) + cpu, 2)
        timing["train_steps_timed"] = timing.get("train_steps_timed", 0) + done
        rss = _rss_mb()
        timing["train_peak_rss_mb"] = max(timing.get("train_peak_rss_mb", 0.0), rss["peak_rss_mb"])
        timing["train_peak_rss_children_mb"] = max(timing.get("train_peak_rss_children_mb", 0.0),
                                                   rss["peak_rss_children_mb"])
        timing["load_average_after_train"] = [round(x, 2) for x in os.getloadavg()]
    timing["total_steps"] = int(summary["total_steps"])
    timing_path.write_text(json.dumps(timing, indent=2))
    if summary.get("stopped_by") and int(summary["step"]) < int(summary["total_steps"]):
        raise SystemExit(f"training of {run_dir} stopped by {summary['stopped_by']} at step {summary['step']}")

    for split, name, probe in (("val", "eval_val.json", False), ("test", "eval.json", True)):
        target = run_dir / name
        if target.is_file():
            continue
        t0 = time.perf_counter()
        evaluate_from_config(EvalConfig(checkpoint=str(run_dir), data=p.get("eval_data") or p["train"]["data"],
                                        split=split, out=str(target),
                                        linear_probe=probe, progress=p["progress"], seed=0, **p["eval"]))
        timing[f"eval_{split}_seconds"] = round(time.perf_counter() - t0, 2)
        timing_path.write_text(json.dumps(timing, indent=2))
    timing["eval_peak_rss_mb"] = _rss_mb()["peak_rss_mb"]  # the process peak: max(train, eval)
    timing_path.write_text(json.dumps(timing, indent=2))
    return {"steps": summary["step"], "steps_trained_now": done}


def run_forwarding_stop_signals(argv: list[str]) -> tuple[int, str | None]:
    """Run ``argv`` and wait for it, passing SIGTERM and SIGINT on to it.

    Without this, ``kill`` of an invocation ended it at once and left its stage
    worker training, no longer under the invocation's run lock, so a second
    invocation could start the same run in the same folder. The trainer stops
    at the next step boundary with a checkpoint; the invocation waits for that.
    Returns the worker's exit code and the name of the signal that stopped it, if any.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return subprocess.run(argv).returncode, None
    proc = subprocess.Popen(argv)
    received: list[str] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return returncode, (received[0] if received else None)


def run_stage(stage: str, payload: dict[str, Any], tag: str, state_dir: Path) -> dict[str, Any]:
    state_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = state_dir / f"{tag}.spec.json", state_dir / f"{tag}.result.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({"stage": stage, "payload": payload, "result": str(result_path)}, indent=2))
    print(f"[quality] {tag}: running", flush=True)
    returncode, stopped_by = run_forwarding_stop_signals(
        [sys.executable, str(Path(__file__).resolve().with_name("quality.py")), "--stage-worker", str(spec_path)])
    if stopped_by is not None:
        raise BenchError(f"stopped by {stopped_by} during stage {tag} (its worker stopped too); run the same command "
                         "again to go on: a training resumes from its last checkpoint")
    if returncode != 0 or not result_path.is_file():
        raise BenchError(f"stage {tag} failed (exit code {returncode}); see the output above. "
                         "Fix it and run the same command again: finished work is kept")
    result = json.loads(result_path.read_text())
    print(f"[quality] {tag}: done in {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def check_run_folder(run: dict[str, Any]) -> None:
    """Refuse a run folder trained with other options (steps, lambdas, data...)."""
    path = Path(run["run_dir"]) / "config.yaml"
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    import dataclasses

    from clip_ping.training.train_config import TrainConfig, comparable_options

    want = comparable_options(_comparable(dataclasses.asdict(TrainConfig(**run["train"]))))
    old = comparable_options(old)
    diff = {k: (old.get(k), v) for k, v in want.items() if k in old and old.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise BenchError(f"{run['run_dir']} was trained with other options ({shown}); "
                         "use another --out, or delete that folder to retrain it")


@contextlib.contextmanager
def exclusive(path: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an advisory lock on ``path`` for the block; yields False at once (``wait=False``) when
    another process holds it. The system releases it when its holder exits, even by kill -9."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _evaluated(run: dict[str, Any]) -> bool:
    run_dir = Path(run["run_dir"])
    return (run_dir / "eval.json").is_file() and (run_dir / "eval_val.json").is_file()


def train_and_evaluate(prof: dict[str, Any], plan: dict[str, Any], state_dir: Path) -> list[str]:
    """Train and evaluate every run not evaluated yet; returns the names of the runs another
    invocation was running (left to it)."""
    for run in plan["runs"]:  # refuse mismatched folders before spending any time
        check_run_folder(run)
    todo = [r for r in plan["runs"] if not _evaluated(r)]
    print(f"[quality] {len(plan['runs']) - len(todo)} runs evaluated already (skipped), {len(todo)} to do", flush=True)
    t0, ran, elsewhere = time.perf_counter(), 0, []
    for i, run in enumerate(todo, 1):
        name = Path(run["run_dir"]).name
        with exclusive(state_dir / f"run-{name}.lock", wait=False) as mine:
            if not mine:
                print(f"[quality] run-{name}: another invocation is running it; skipped", flush=True)
                elsewhere.append(name)
                continue
            if _evaluated(run):  # finished by another invocation since the list was made
                print(f"[quality] run-{name}: evaluated by another invocation; skipped", flush=True)
                continue
            run_stage("run", {"train": run["train"], "eval_data": run.get("eval_data"), "eval": prof["eval"],
                              "progress": sys.stderr.isatty()},
                      f"run-{name}", state_dir)
        ran += 1
        per_run = (time.perf_counter() - t0) / ran
        print(f"[quality] {i}/{len(todo)} runs done; about {per_run * (len(todo) - i) / 60:.0f} min left "
              f"at {per_run:.0f} s per run", flush=True)
    return elsewhere
