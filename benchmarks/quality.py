"""Quality benchmark of issue 7: plain CLIP against CLIP-PING (and its ablations), several seeds.

    .venv/bin/python benchmarks/quality.py --profile quick                 # OpenClipart, CLIP vs CLIP-PING, 3 seeds
    .venv/bin/python benchmarks/quality.py --profile full                  # + NN/XNN, top-k, queue, lambdas, heads, teacher
    .venv/bin/python benchmarks/quality.py --profile tiny --data synth     # minutes: every code path on tiny data
    .venv/bin/python benchmarks/quality.py --profile methods               # every method, paired vs CLIP and CLIP-PING
    .venv/bin/python benchmarks/quality.py --profile quick --dry-run       # print the plan only

Pipeline (every step is skipped when its output is complete, so an interrupted
benchmark is resumed by running the same command again):

1. data: the OpenClipart library (Debian ``openclipart-png`` + ``openclipart-svg``)
   converted by ``convert_openclipart`` into ``benchmarks/work/openclipart``, or
   the built-in synthetic set; then teacher feature banks (``extract_banks``,
   default teachers; a second bank per extra image teacher) and neighbour
   tables (``build_neighbors``, k >= 10).
2. training: every setting of the profile x every seed, same student, data,
   steps and batch, into ``OUT/runs/<setting>-seed<k>`` with ``resume="auto"``;
   a run folder holding ``eval.json`` is complete and skipped.
3. evaluation of every run on the test split (``eval.json``: zero-shot top-1/5
   on the taxonomy labels, I2T/T2I recall, linear probe) and on the val split
   (``eval_val.json``: zero-shot and retrieval; the val-split probe number is
   the probe's accuracy on val at the C it selects there, from ``eval.json``).
4. aggregation: mean and sample std over seeds per setting, paired deltas
   against plain CLIP, a recommendation of defaults picked on the VALIDATION
   split only, timings and peak memory of every stage. Written to
   ``benchmarks/results/quality_<profile>_<data>.{json,md}``; plots and the
   standard comparison under ``OUT/report`` (``clip_ping.report``).

Each stage runs in its own subprocess (this file with ``--stage-worker``), so
its wall time and peak resident memory (``ru_maxrss`` of the process, and of
its DataLoader workers separately) are measured alone.

Profiles are in ``benchmarks/quality_profiles.yaml``. The quick and full
profiles share their training options, so ``full`` reuses the clip and
clip-ping runs of ``quick`` in the same ``--out``. A run folder trained with
other options is refused, never silently reused.

Several invocations may share one ``--out`` (one per core, say, each with its
own ``--tag``): the preparation holds a lock the others wait for, and each run
is taken by one invocation only (a lock per run, released by the system if
its holder dies); the others skip it and move on.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import fcntl
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from clip_ping.report import seed_stats  # noqa: E402  (mean and spread over seeds, as the report computes them)

PROFILES_FILE = Path(__file__).with_name("quality_profiles.yaml")
NO_BANK_METHODS = ("clip", "declip-nns", "slip")  # methods that read no teacher bank
SECOND_BASELINE = "clip-ping"  # profiles that hold it also get paired deltas against it
WORK = (ROOT / "benchmarks" / "work").resolve()  # one spelling of every path, also through a symlinked work folder
RESULTS = ROOT / "benchmarks" / "results"
BASELINE = "clip"
REFERENCE = "clip-ping"  # the current defaults; a change is recommended only when it beats them on val
APT_PACKAGES = ("openclipart-png", "openclipart-svg")
# TrainConfig keys that do not change what a run computes (a finished run may differ here).
BOOKKEEPING = {"out", "resume", "workers", "progress", "tensorboard", "device", "log_every", "save_every",
               "keep_checkpoints", "overwrite", "prefetch_batches", "max_skipped_fraction", "image_cache",
               "image_cache_gb"}
STAGE_TIMINGS = "quality_timing.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class BenchError(RuntimeError):
    """A problem the user can act on; printed as one line."""


# --------------------------------------------------------------------------- profiles


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_profiles(path: Path = PROFILES_FILE) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BenchError(f"cannot read the profiles file {path}: {exc}") from None
    for key in ("defaults", "settings", "profiles"):
        if not isinstance(spec.get(key), dict):
            raise BenchError(f"{path}: missing section '{key}'")
    return spec


def resolve_profile(name: str, data: str, *, spec: dict[str, Any] | None = None, seeds: list[int] | None = None,
                    steps: int | None = None, settings: list[str] | None = None,
                    precision: str | None = None) -> dict[str, Any]:
    """The profile ``name`` merged over the defaults, with command-line overrides; validated."""
    from dataclasses import fields

    from clip_ping.training.trainer import TrainConfig

    spec = spec or load_profiles()
    if name not in spec["profiles"]:
        raise BenchError(f"unknown profile {name!r}; profiles: {', '.join(spec['profiles'])}")
    prof = deep_merge(spec["defaults"], spec["profiles"][name])
    prof["name"] = name
    if data not in prof["data"]:
        raise BenchError(f"unknown data set {data!r}; choose one of {', '.join(prof['data'])}")
    prof["data_name"] = data
    prof["data_options"] = prof["data"][data]
    if seeds:
        prof["seeds"] = list(seeds)
    if steps:
        prof["train"]["steps"] = steps
    if precision:
        prof["train"]["precision"] = precision
    if settings:
        prof["settings"] = list(settings)
    unknown = [s for s in prof["settings"] if s not in spec["settings"]]
    if unknown:
        raise BenchError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(spec['settings'])}")
    if len(set(prof["seeds"])) != len(prof["seeds"]) or not prof["seeds"]:
        raise BenchError("seeds must be distinct and at least one")
    prof["setting_specs"] = {s: dict(spec["settings"][s]) for s in prof["settings"]}
    prof["choices"] = {g: [s for s in members if s in prof["settings"]]
                       for g, members in (spec.get("choices") or {}).items()}
    train_keys = {f.name for f in fields(TrainConfig)}
    for key in prof["train"]:
        if key not in train_keys or key in ("data", "out", "banks", "seed", "resume"):
            raise BenchError(f"profile {name}: 'train' key {key!r} is not a shared TrainConfig option")
    max_topk = 1
    for s, over in prof["setting_specs"].items():
        for key, value in over.items():
            if key not in ("teacher", "neighbors", "extract") and key not in train_keys:
                raise BenchError(f"setting {s}: {key!r} is not a TrainConfig option")
        _check_neighbor_options(s, over.get("neighbors"))
        _check_extract_options(s, over.get("extract"))
        max_topk = max(max_topk, int(over.get("neighbor_topk", 1)))
    if prof["neighbor_k"] < max(10, max_topk):
        raise BenchError(f"neighbor_k must be at least max(10, largest neighbor_topk={max_topk})")
    if BASELINE not in prof["settings"]:
        raise BenchError(f"every profile needs the '{BASELINE}' baseline setting")
    return prof


def _check_options(setting: str, key: str, options: Any, config: type, fixed: set[str], what: str) -> None:
    """A setting's own options under ``key``: a non-empty mapping of ``config``'s fields, less the ``fixed`` ones."""
    if options is None:
        return
    from dataclasses import fields

    allowed = {f.name for f in fields(config)} - fixed
    if not isinstance(options, dict) or not options or set(options) - allowed:
        raise BenchError(f"setting {setting}: '{key}' takes a mapping of {what} "
                         f"({', '.join(sorted(allowed))}), got {options!r}")


def _check_neighbor_options(setting: str, options: Any) -> None:
    """A setting's own neighbour search (e.g. ``{method: ivf, nprobe: 4}``): search options only."""
    from clip_ping.knn import NeighborsConfig

    _check_options(setting, "neighbors", options, NeighborsConfig, {"banks", "k", "progress", "overwrite"},
                   "search options")


def _check_extract_options(setting: str, options: Any) -> None:
    """A setting's own bank (e.g. ``{precision: bf16}``): extraction options over the profile's ``extract``."""
    from clip_ping.banks import ExtractConfig

    _check_options(setting, "extract", options, ExtractConfig,
                   {"data", "out", "split", "image_teacher", "text_teacher", "progress"}, "extraction options")


def _slug(options: dict[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(options.items()))


def neighbor_variant_dir(bank: Path, options: dict[str, Any]) -> Path:
    """The folder of a bank's second neighbour table: the bank's files linked, its own search."""
    return bank.parent / f"{bank.name}-nn-{_slug(options)}"


# --------------------------------------------------------------------------- plan


def data_dir_for(prof: dict[str, Any]) -> Path:
    opts = prof["data_options"]
    if prof["data_name"] == "openclipart":
        size = int(opts.get("image_size", 128))
        # v2: captions without boilerplate, splits by caption and image group (no test caption in train)
        return WORK / ("openclipart-v2" if size == 128 else f"openclipart-v2-{size}px")
    return WORK / (f"synth-{opts['n_train']}-{opts['n_val']}-{opts['n_test']}-{opts['image_size']}px"
                   f"-seed{opts.get('seed', 0)}")


def bank_dir_for(data_dir: Path, image_teacher: str, default_teacher: str, extract: dict[str, Any] | None = None) -> Path:
    """``banks`` (the default teacher, the profile's extraction), else ``banks-<teacher>`` and/or ``-<options>``."""
    parts = ([] if image_teacher == default_teacher else [image_teacher]) + ([_slug(extract)] if extract else [])
    return data_dir / "-".join(["banks", *parts])


def bank_name_for(image_teacher: str, extract: dict[str, Any] | None = None) -> str:
    """The key of a bank in the plan and in the stage records: the teacher, plus its own extraction options."""
    return f"{image_teacher}+{_slug(extract)}" if extract else image_teacher


def make_plan(prof: dict[str, Any], out: Path) -> dict[str, Any]:
    data_dir = data_dir_for(prof)
    default_teacher = prof["image_teacher"]
    banks: dict[str, str] = {}  # bank name (bank_name_for) -> folder
    bank_specs: dict[str, dict[str, Any]] = {}  # bank name -> its image teacher and extraction options
    variants: dict[str, dict[str, Any]] = {}  # second neighbour tables over a teacher's bank
    runs = []
    # Seeds outer, settings inner: an interrupted benchmark has whole seeds, and runs
    # compared with each other are trained close in time (similar machine load).
    for seed in prof["seeds"]:
        for setting in prof["settings"]:
            over = dict(prof["setting_specs"][setting])
            teacher = over.pop("teacher", default_teacher)
            search = over.pop("neighbors", None)
            extract = over.pop("extract", None)
            bank = bank_dir_for(data_dir, teacher, default_teacher, extract)
            uses_bank = over.get("method", "clip-ping") not in NO_BANK_METHODS
            if uses_bank:
                name = bank_name_for(teacher, extract)
                banks.setdefault(name, str(bank))
                bank_specs.setdefault(name, {"image_teacher": teacher, "extract": {**prof["extract"], **(extract or {})}})
                if search:
                    variant = neighbor_variant_dir(bank, search)
                    variants[str(variant)] = {"source": str(bank), "teacher": teacher, "options": dict(search)}
                    bank = variant
            run_dir = out / "runs" / f"{setting}-seed{seed}"
            train = {**prof["train"], **over, "data": str(data_dir), "out": str(run_dir), "seed": seed,
                     "resume": "auto", "tensorboard": False, "progress": sys.stderr.isatty(),
                     "banks": str(bank) if uses_bank else None}
            runs.append({"setting": setting, "seed": seed, "run_dir": str(run_dir), "teacher": teacher,
                         "train": train})
    return {"data_dir": str(data_dir), "banks": banks, "bank_specs": bank_specs, "neighbor_variants": variants,
            "runs": runs}


# --------------------------------------------------------------------------- stage workers (child processes)


def _rss_mb() -> dict[str, float]:
    """Peak resident memory so far: this process, and its largest finished child (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_rss_children_mb": round(children, 1)}


def _cpu_s() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _worker_data(p: dict[str, Any]) -> dict[str, Any]:
    if p["kind"] == "openclipart":
        from clip_ping.data.openclipart import OpenClipartConfig, convert_openclipart

        out = Path(p["out"])
        partial = out.exists() and any(out.iterdir())  # interrupted earlier (the summary is written last)
        opts = {k: v for k, v in p["options"].items()}
        summary = convert_openclipart(OpenClipartConfig(out=str(out), overwrite=partial, **opts))
        return {"pairs": summary["per_split"], "classes": summary["classes"], "skipped": summary["skipped"]}
    from clip_ping.data.synth import SynthConfig, generate_synthetic

    generate_synthetic(SynthConfig(out=p["out"], **p["options"]), progress=p["progress"])
    return {}


def _worker_extract(p: dict[str, Any]) -> dict[str, Any]:
    from clip_ping.banks import ExtractConfig, extract_banks

    extract_banks(ExtractConfig(data=p["data"], out=p["out"], image_teacher=p["image_teacher"],
                                text_teacher=p["text_teacher"], progress=p["progress"], **p["options"]))
    manifest = json.loads((Path(p["out"]) / "manifest.json").read_text())
    return {"count": manifest.get("count"), "dims": manifest.get("dims") or
            {k: manifest.get(k) for k in ("image_dim", "text_dim") if k in manifest}}


def _worker_neighbors(p: dict[str, Any]) -> dict[str, Any]:
    from clip_ping.knn import NeighborsConfig, build_neighbors

    path = build_neighbors(NeighborsConfig(banks=p["banks"], k=p["k"], progress=p["progress"], overwrite=p["overwrite"],
                                           **p.get("options", {})))
    info = json.loads(Path(path).read_text())
    return {"k": info.get("k"), "method": info.get("method"), "mean_top1_score": info.get("mean_top1_score")}


def top1_recall(exact_bank: Path, other_bank: Path) -> dict[str, float]:
    """Recall@1 of a second neighbour table against the exact one, per side. A row counts as found when
    its top-1 score reaches the exact top-1 score (1e-5): tied neighbours (features equal to float
    precision, 18 % of OpenClipart v2's image rows) are equally right, whichever id a search returns."""
    import numpy as np

    out = {}
    for side in ("image", "text"):
        exact = np.load(exact_bank / f"neighbors_{side}_scores.npy")[:, 0]
        found = np.load(other_bank / f"neighbors_{side}_scores.npy")[:, 0]
        out[side] = round(float(np.mean(found >= exact - 1e-5)), 4)
    return out


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
        evaluate_from_config(EvalConfig(checkpoint=str(run_dir), data=p["train"]["data"], split=split, out=str(target),
                                        linear_probe=probe, progress=p["progress"], seed=0, **p["eval"]))
        timing[f"eval_{split}_seconds"] = round(time.perf_counter() - t0, 2)
        timing_path.write_text(json.dumps(timing, indent=2))
    timing["eval_peak_rss_mb"] = _rss_mb()["peak_rss_mb"]  # the process peak: max(train, eval)
    timing_path.write_text(json.dumps(timing, indent=2))
    return {"steps": summary["step"], "steps_trained_now": done}


WORKERS = {"data": _worker_data, "extract": _worker_extract, "neighbors": _worker_neighbors, "run": _worker_run}


def stage_worker(spec_path: str) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    t0, c0 = time.perf_counter(), _cpu_s()
    info = WORKERS[spec["stage"]](spec["payload"])
    result = {"seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(_cpu_s() - c0, 2), **_rss_mb(),
              "load_average": [round(x, 2) for x in os.getloadavg()], **info}
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------- parent: stages in subprocesses


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
        [sys.executable, str(Path(__file__).resolve()), "--stage-worker", str(spec_path)])
    if stopped_by is not None:
        raise BenchError(f"stopped by {stopped_by} during stage {tag} (its worker stopped too); run the same command "
                         "again to go on: a training resumes from its last checkpoint")
    if returncode != 0 or not result_path.is_file():
        raise BenchError(f"stage {tag} failed (exit code {returncode}); see the output above. "
                         "Fix it and run the same command again: finished work is kept")
    result = json.loads(result_path.read_text())
    print(f"[quality] {tag}: done in {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def ensure_openclipart_installed(root: Path) -> None:
    if (root / "png").is_dir() and (root / "svg").is_dir():
        return
    cmd = "apt-get update && apt-get install -y " + " ".join(APT_PACKAGES)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"[quality] OpenClipart not found under {root}; installing it: {cmd}", flush=True)
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *APT_PACKAGES]):
            if subprocess.run(argv, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}).returncode != 0:
                raise BenchError(f"'{' '.join(argv)}' failed; install the packages yourself: sudo {cmd}")
        if (root / "png").is_dir() and (root / "svg").is_dir():
            return
    raise BenchError(f"OpenClipart not found under {root}; install it with: sudo {cmd} "
                     "(or use --data synth)")


def prepare(prof: dict[str, Any], plan: dict[str, Any], state_dir: Path) -> dict[str, Any]:
    """Data set, banks, neighbours; returns the stage records (timings kept next to the outputs)."""
    progress = sys.stderr.isatty()
    data_dir = Path(plan["data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    records_path = data_dir / STAGE_TIMINGS
    records = _read_json(records_path) or {}

    def record(key: str, result: dict[str, Any] | None) -> None:
        if result is not None:
            records[key] = result
            records_path.write_text(json.dumps(records, indent=2))

    # data set
    if prof["data_name"] == "openclipart":
        complete = (data_dir / "openclipart_summary.json").is_file()
        if not complete:
            ensure_openclipart_installed(Path(prof["data_options"].get("root", "/usr/share/openclipart")))
        payload = {"kind": "openclipart", "out": str(data_dir), "options": prof["data_options"]}
    else:
        complete = all((data_dir / f).is_file() for f in ("dataset.json", "train.csv", "val.csv", "test.csv"))
        payload = {"kind": "synth", "out": str(data_dir), "options": prof["data_options"], "progress": progress}
    if complete:
        print(f"[quality] data: {data_dir} is complete, kept", flush=True)
    else:
        record("data", run_stage("data", payload, "data", state_dir))

    # banks and neighbours, one pair per bank in use (an image teacher, or a setting's own extraction options)
    for name, bank in plan["banks"].items():  # name: the teacher, plus the bank's own options (bank_name_for)
        bank = Path(bank)
        spec = plan["bank_specs"][name]
        if (bank / "manifest.json").is_file():
            print(f"[quality] extract {name}: {bank} is complete, kept", flush=True)
        else:
            record(f"extract:{name}", run_stage("extract", {
                "data": str(data_dir), "out": str(bank), "image_teacher": spec["image_teacher"],
                "text_teacher": prof["text_teacher"], "progress": progress, "options": spec["extract"]},
                f"extract-{name}", state_dir))
        info = _read_json(bank / "neighbors.json") or {}
        if _neighbors_fresh(info, bank, prof["neighbor_k"]):
            print(f"[quality] neighbours {name}: k={info['k']} in {bank}, kept", flush=True)
        else:
            record(f"neighbors:{name}", run_stage("neighbors", {
                "banks": str(bank), "k": prof["neighbor_k"], "progress": progress,
                "overwrite": bool(info)}, f"neighbors-{name}", state_dir))

    for variant, spec in plan.get("neighbor_variants", {}).items():
        key = f"neighbors:{Path(variant).name}"
        record(key, prepare_neighbor_variant(Path(variant), spec, prof["neighbor_k"], records.get(key), state_dir,
                                             progress))
    return records


def _neighbors_fresh(info: dict[str, Any], bank: Path, k: int) -> bool:
    """Whether a neighbour table (its ``neighbors.json`` ``info``) is of ``bank``'s features, with at least k."""
    fp = (_read_json(bank / "manifest.json") or {}).get("fingerprint")
    return bool(info and fp and info.get("bank_fingerprint") == fp and int(info.get("k", 0)) >= k)


def prepare_neighbor_variant(variant: Path, spec: dict[str, Any], k: int, done: dict[str, Any] | None,
                             state_dir: Path, progress: bool = False) -> dict[str, Any]:
    """A second neighbour table over a bank (``spec``: source bank, search options): the bank's
    features and manifest linked, its own search, and its recall@1 against the source's exact table.
    ``done`` is the earlier record, returned as is when the table is still that bank's."""
    source = Path(spec["source"])
    variant.mkdir(exist_ok=True)
    for f in source.iterdir():  # the bank's features and manifest, shared; the neighbour files its own
        if not f.name.startswith("neighbors") and not (variant / f.name).exists():
            (variant / f.name).symlink_to(f.resolve())
    info = _read_json(variant / "neighbors.json") or {}
    if done and _neighbors_fresh(info, source, k):
        print(f"[quality] neighbours {variant.name}: kept", flush=True)
        return done
    result = run_stage("neighbors", {"banks": str(variant), "k": k, "progress": progress, "overwrite": bool(info),
                                     "options": spec["options"]}, f"neighbors-{variant.name}", state_dir)
    result["top1_recall_vs_exact"] = top1_recall(source, variant)
    print(f"[quality] neighbours {variant.name}: recall@1 vs exact {result['top1_recall_vs_exact']}", flush=True)
    return result


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in BOOKKEEPING}


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
            run_stage("run", {"train": run["train"], "eval": prof["eval"], "progress": sys.stderr.isatty()},
                      f"run-{name}", state_dir)
        ran += 1
        per_run = (time.perf_counter() - t0) / ran
        print(f"[quality] {i}/{len(todo)} runs done; about {per_run * (len(todo) - i) / 60:.0f} min left "
              f"at {per_run:.0f} s per run", flush=True)
    return elsewhere


# --------------------------------------------------------------------------- metrics and aggregation


def run_metrics(eval_test: dict[str, Any], eval_val: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Flat metrics per split: zs/<task>/top1, i2t/R@k, t2i/R@k, probe/<task>; and the val score."""
    out: dict[str, dict[str, float]] = {}
    for split, ev in (("test", eval_test), ("val", eval_val)):
        if not ev:
            continue
        m: dict[str, float] = {}
        for task, scores in (ev.get("zeroshot") or {}).items():
            m[f"zs/{task}/top1"] = float(scores["top1"])
        for short, key in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
            for k in ("R@1", "R@5"):
                value = (ev.get("retrieval") or {}).get(key, {}).get(k)
                if value is not None:
                    m[f"{short}/{k}"] = float(value)
        out[split] = m
    # Linear probe: test accuracy, and on val the accuracy at the C selected on val (fit on train).
    for task, probe in ((eval_test or {}).get("linear_probe") or {}).items():
        out.setdefault("test", {})[f"probe/{task}"] = float(probe["accuracy"])
        if "val" in out and probe.get("val_accuracy") is not None:
            out["val"][f"probe/{task}"] = float(probe["val_accuracy"])
    for split, m in out.items():
        parts = [v for k, v in m.items() if k.startswith("zs/")] + [m[k] for k in ("i2t/R@1", "t2i/R@1") if k in m]
        if parts:
            m["score"] = sum(parts) / len(parts)
    return out


def metric_label(key: str) -> str:
    if key == "score":
        return "score (mean of ZS top-1s, I2T R@1, T2I R@1)"
    kind, *rest = key.split("/")
    if kind == "zs":
        return f"zero-shot {rest[0]} top-1"
    if kind == "probe":
        return f"linear probe {rest[0]}"
    return f"{kind.upper()} {rest[0]}"


def _metrics_of(results: list[dict[str, Any]], split: str) -> list[str]:
    keys: list[str] = []
    for r in results:
        for k in r["metrics"].get(split, {}):
            if k not in keys:
                keys.append(k)
    order = lambda k: ({"zs": 0, "i2t": 1, "t2i": 2, "probe": 3}.get(k.split("/")[0], 4), k)  # noqa: E731
    return sorted(keys, key=order)


def aggregate(results: list[dict[str, Any]], settings: list[str], baseline: str = BASELINE) -> dict[str, Any]:
    """Per split, setting and metric: mean/std/n over seeds; paired delta against ``baseline``."""
    agg: dict[str, Any] = {}
    for split in ("test", "val"):
        keys = _metrics_of(results, split)
        per: dict[str, Any] = {}
        for setting in settings:
            runs = [r for r in results if r["setting"] == setting and split in r["metrics"]]
            if not runs:
                continue
            base = {r["seed"]: r for r in results if r["setting"] == baseline and split in r["metrics"]}
            entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "metrics": {}}
            for key in keys:
                vals = [r["metrics"][split][key] for r in runs if key in r["metrics"][split]]
                if not vals:
                    continue
                stats = seed_stats(vals)
                if setting != baseline:
                    diffs = [r["metrics"][split][key] - base[r["seed"]]["metrics"][split][key]
                             for r in runs if r["seed"] in base and key in r["metrics"][split]
                             and key in base[r["seed"]]["metrics"][split]]
                    if diffs:
                        d = seed_stats(diffs)
                        stats["delta_vs_clip"] = {"mean": d["mean"], "std": d["std"], "n": d["n"],
                                                  "paired_seeds": True}
                entry["metrics"][key] = stats
            per[setting] = entry
        agg[split] = {"metric_keys": keys, "settings": per}
    return agg


def _setting_value(group: str, spec: dict[str, Any], default_teacher: str) -> Any:
    from clip_ping.training.trainer import TrainConfig

    d = TrainConfig()
    if group == "lambdas":
        if spec.get("method") == "clip":
            return {"method": "clip", "lambda_nn": 0.0, "lambda_xnn": 0.0}
        return {"lambda_nn": spec.get("lambda_nn", d.lambda_nn), "lambda_xnn": spec.get("lambda_xnn", d.lambda_xnn)}
    if group == "image_teacher":
        return spec.get("teacher", default_teacher)
    return spec.get(group, getattr(d, group, None))


def recommend(agg: dict[str, Any], prof: dict[str, Any]) -> dict[str, Any]:
    """Defaults chosen on the VALIDATION split only, one factor at a time against the reference setting.

    Within each group the setting with the best mean val score wins; it replaces
    the reference (current default) only when its paired val gain over seeds is
    larger than one standard deviation of that gain, else the default is kept.
    """
    val = agg.get("val", {}).get("settings", {})
    out: dict[str, Any] = {
        "split": "val",
        "rule": ("score = mean of the zero-shot top-1 of every task, I2T R@1 and T2I R@1 on the VALIDATION split; "
                 "within each group the best mean score is recommended when its paired gain over the current default "
                 f"('{REFERENCE}') exceeds one standard deviation over seeds, otherwise the default is kept. "
                 "The test split plays no part in the choice."),
        "groups": {},
    }

    def score(setting: str) -> dict[str, Any] | None:
        return val.get(setting, {}).get("metrics", {}).get("score")

    def seed_scores(setting: str) -> dict[Any, float]:
        entry = val.get(setting)
        if not entry or "score" not in entry["metrics"]:
            return {}
        return dict(zip(entry["seeds"], entry["metrics"]["score"]["values"]))

    for group, members in prof["choices"].items():
        present = [m for m in members if score(m) is not None]
        if len(present) < 2:
            continue
        ranked = sorted(present, key=lambda m: score(m)["mean"], reverse=True)
        best = ranked[0]
        reference = REFERENCE if REFERENCE in present else ranked[-1]
        ref_s, best_s = seed_scores(reference), seed_scores(best)
        diffs = [best_s[s] - ref_s[s] for s in best_s if s in ref_s]
        gain = seed_stats(diffs) if diffs else None
        clear = bool(best != reference and gain and gain["std"] is not None and gain["mean"] > gain["std"])
        chosen = best if (best == reference or clear) else reference
        out["groups"][group] = {
            "ranking": [{"setting": m, "val_score_mean": score(m)["mean"], "val_score_std": score(m)["std"]}
                        for m in ranked],
            "best_on_val": best,
            "reference": reference,
            "gain_over_reference": None if best == reference or gain is None else
            {"mean": gain["mean"], "std": gain["std"], "n": gain["n"]},
            "clear": clear if best != reference else None,
            "recommended_setting": chosen,
            "recommended_value": _setting_value(group, prof["setting_specs"][chosen], prof["image_teacher"]),
        }
    return out


def cost_summary(results: list[dict[str, Any]], records: dict[str, Any], settings: list[str],
                 default_teacher: str) -> dict[str, Any]:
    per_setting = {}
    for setting in settings:
        runs = [r for r in results if r["setting"] == setting and r["timing"].get("train_steps_timed")]
        if not runs:
            continue
        s_per_step = [r["timing"]["train_seconds"] / r["timing"]["train_steps_timed"] for r in runs]
        cpu_per_step = [r["timing"]["train_cpu_seconds"] / r["timing"]["train_steps_timed"] for r in runs
                        if "train_cpu_seconds" in r["timing"]]
        sps = [r["samples_per_s"] for r in runs if r.get("samples_per_s")]
        per_setting[setting] = {
            "runs_timed": len(runs),
            "train_seconds_mean": sum(r["timing"]["train_seconds"] for r in runs) / len(runs),
            "s_per_step": seed_stats(s_per_step),
            "cpu_s_per_step": seed_stats(cpu_per_step) if cpu_per_step else None,
            "samples_per_s_logged": seed_stats(sps) if sps else None,
            "train_peak_rss_mb": max(r["timing"].get("train_peak_rss_mb", 0.0) for r in runs),
            "train_peak_rss_children_mb": max(r["timing"].get("train_peak_rss_children_mb", 0.0) for r in runs),
            "eval_seconds_mean": sum(r["timing"].get("eval_val_seconds", 0) + r["timing"].get("eval_test_seconds", 0)
                                     for r in runs) / len(runs),
            "eval_peak_rss_mb": max(r["timing"].get("eval_peak_rss_mb", 0.0) for r in runs),
        }
    out: dict[str, Any] = {"stages": records, "training": per_setting}
    if BASELINE in per_setting and REFERENCE in per_setting:
        a, b = per_setting[BASELINE], per_setting[REFERENCE]
        out["step_time_ratio_clip_ping_over_clip"] = b["s_per_step"]["mean"] / a["s_per_step"]["mean"]
        if a["samples_per_s_logged"] and b["samples_per_s_logged"]:
            out["steady_step_time_ratio_clip_ping_over_clip"] = (a["samples_per_s_logged"]["mean"]
                                                                 / b["samples_per_s_logged"]["mean"])
        if a["cpu_s_per_step"] and b["cpu_s_per_step"]:
            out["cpu_time_ratio_clip_ping_over_clip"] = b["cpu_s_per_step"]["mean"] / a["cpu_s_per_step"]["mean"]
        offline = sum(v["seconds"] for k, v in records.items()
                      if k in (f"extract:{default_teacher}", f"neighbors:{default_teacher}"))
        out["offline_seconds_default_teachers"] = offline or None
        out["offline_over_one_clip_ping_run"] = (offline / b["train_seconds_mean"]) if offline else None
    return out


def collect(plan: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for run in plan["runs"]:
        run_dir = Path(run["run_dir"])
        ev_test, ev_val = _read_json(run_dir / "eval.json"), _read_json(run_dir / "eval_val.json")
        if ev_test is None:
            continue
        timing = _read_json(run_dir / STAGE_TIMINGS) or {}
        sps = []
        if (run_dir / "metrics.jsonl").is_file():
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            sps = [r["samples_per_s"] for r in records[1:] if isinstance(r.get("samples_per_s"), (int, float))]
        results.append({"setting": run["setting"], "seed": run["seed"], "run_dir": str(run_dir),
                        "teacher": run["teacher"], "config": _comparable(run["train"]),
                        "metrics": run_metrics(ev_test, ev_val), "timing": timing,
                        "samples_per_s": (sum(sps) / len(sps)) if sps else None,
                        "eval_test": {k: ev_test.get(k) for k in ("zeroshot", "retrieval", "linear_probe", "n_images")},
                        "eval_val": {k: (ev_val or {}).get(k) for k in ("zeroshot", "retrieval", "n_images")}})
    return results


# --------------------------------------------------------------------------- markdown


def _cell(stats: dict[str, Any] | None, delta: bool = False) -> str:
    if not stats:
        return "–"
    sign = "+" if delta and stats["mean"] >= 0 else ""
    text = f"{sign}{stats['mean']:.2f}"
    return text + (f" ± {stats['std']:.2f}" if stats.get("std") is not None else "")


def markdown(doc: dict[str, Any]) -> str:
    prof = doc["profile"]
    lines = [f"# Quality benchmark: profile `{prof['name']}`, data `{prof['data_name']}`", "",
             f"- date: {doc['date']}",
             "- command(s): " + "; ".join(f"`{c}`" for c in doc["commands"]),
             f"- machine: {doc['machine']['cpus']} CPUs ({doc['machine']['processor']}), torch "
             f"{doc['machine']['torch']}, load average at start {doc['machine']['load_average_start']}",
             f"- student {prof['train']['model']}, {prof['train'].get('steps')} steps x batch "
             f"{prof['train']['batch_size']} ({doc['epochs_equivalent']:.1f} epochs of {doc['n_train']} train pairs), "
             f"lr {prof['train']['lr']}, precision {prof['train']['precision']}, seeds {prof['seeds']}; "
             f"teachers {prof['image_teacher']} + {prof['text_teacher']}, k={prof['neighbor_k']} neighbours stored",
             "- cells: mean ± sample std over seeds (%); Δ: paired difference to plain CLIP at the same seed, "
             "mean ± std over seeds"]
    for name, spec in (doc.get("neighbor_variants") or {}).items():
        recall = spec.get("top1_recall_vs_exact") or {}
        lines.append(f"- neighbour table `{name}`: search {spec['options']} over the {spec['teacher']} bank; recall@1 "
                     f"against the exact table (ties count as found): image {recall.get('image')}, "
                     f"text {recall.get('text')}")
    lines.append("")
    for split, title in (("test", "Test split"), ("val", "Validation split")):
        block = doc["aggregate"].get(split)
        if not block or not block["settings"]:
            continue
        keys = block["metric_keys"]
        lines += [f"## {title}", "", "| setting | n | " + " | ".join(metric_label(k) for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for setting, entry in block["settings"].items():
            lines.append(f"| {setting} | {len(entry['seeds'])} | "
                         + " | ".join(_cell(entry["metrics"].get(k)) for k in keys) + " |")
        lines += ["", f"Δ vs plain CLIP ({split}):", "", "| setting | " + " | ".join(metric_label(k) for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for setting, entry in block["settings"].items():
            if setting == BASELINE:
                continue
            lines.append(f"| {setting} | " + " | ".join(
                _cell((entry["metrics"].get(k) or {}).get("delta_vs_clip"), delta=True) for k in keys) + " |")
        lines.append("")
        vs_ping = (doc.get("aggregate_vs_clip_ping") or {}).get(split)
        if vs_ping and set(vs_ping["settings"]) - {BASELINE, SECOND_BASELINE}:
            lines += [f"Δ vs CLIP-PING defaults ({split}):", "",
                      "| setting | " + " | ".join(metric_label(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
            for setting, entry in vs_ping["settings"].items():
                if setting in (BASELINE, SECOND_BASELINE):
                    continue
                lines.append(f"| {setting} | " + " | ".join(
                    _cell((entry["metrics"].get(k) or {}).get("delta_vs_clip"), delta=True) for k in keys) + " |")
            lines.append("")
    if split_note := doc.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in split_note] + [""]

    rec = doc["recommendation"]
    lines += ["## Recommended defaults (chosen on the VALIDATION split only)", "", rec["rule"], ""]
    if rec["groups"]:
        lines += ["| choice | ranking on val (score mean ± std) | best | gain over default (paired) | recommended |",
                  "|---|---|---|---|---|"]
        for group, g in rec["groups"].items():
            ranking = ", ".join(f"{r['setting']} {r['val_score_mean']:.2f}"
                                + (f" ± {r['val_score_std']:.2f}" if r["val_score_std"] is not None else "")
                                for r in g["ranking"])
            gain = g["gain_over_reference"]
            gain_text = "–" if gain is None else _cell(gain, delta=True) + (
                "" if g["clear"] else " (one seed: no noise estimate, default kept)" if gain["std"] is None
                else " (within noise, default kept)")
            lines.append(f"| {group} | {ranking} | {g['best_on_val']} | {gain_text} | "
                         f"{g['recommended_setting']}: `{json.dumps(g['recommended_value'])}` |")
    else:
        lines.append("(no group with two or more settings in this profile)")
    lines.append("")

    cost = doc["cost"]
    lines += ["## Cost", "", "| stage | wall s | CPU s | peak RSS MB (process / largest child) |", "|---|---|---|---|"]
    for name, r in cost["stages"].items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {r.get('cpu_seconds', float('nan')):.1f} | "
                     f"{r['peak_rss_mb']:.0f} / {r.get('peak_rss_children_mb', 0):.0f} |")
    lines += ["", "| training setting | runs timed | s/step (wall incl. start-up) | CPU s/step | samples/s (logged) | "
              "train wall s (mean) | train peak RSS MB (process / worker) | eval s (val+test) | eval peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for setting, t in cost["training"].items():
        lines.append(f"| {setting} | {t['runs_timed']} | {_cell(t['s_per_step'])} | {_cell(t['cpu_s_per_step'])} | "
                     f"{_cell(t['samples_per_s_logged'])} | {t['train_seconds_mean']:.0f} | "
                     f"{t['train_peak_rss_mb']:.0f} / {t['train_peak_rss_children_mb']:.0f} | "
                     f"{t['eval_seconds_mean']:.0f} | {t['eval_peak_rss_mb']:.0f} |")
    lines.append("")
    if cost.get("step_time_ratio_clip_ping_over_clip"):
        lines.append(f"- step time CLIP-PING / CLIP: {cost.get('steady_step_time_ratio_clip_ping_over_clip', float('nan')):.3f} "
                     f"(steady state, from the logged samples/s after the first log interval); "
                     f"{cost['step_time_ratio_clip_ping_over_clip']:.3f} (wall time of the whole training stage, "
                     f"start-up included), {cost.get('cpu_time_ratio_clip_ping_over_clip', float('nan')):.3f} (CPU time "
                     "of the stage). Runs share the machine with whatever else runs: see the load averages")
    if cost.get("offline_over_one_clip_ping_run"):
        lines.append(f"- offline stage (extraction + neighbours, default teachers): "
                     f"{cost['offline_seconds_default_teachers']:.0f} s = "
                     f"{cost['offline_over_one_clip_ping_run']:.2f} x one CLIP-PING training run")
    lines.append(f"- wall time of this invocation: {doc['wall_seconds']:.0f} s (stages skipped as complete take ~0 s)")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick",
                        help="profile of quality_profiles.yaml (quick, full, duplicates, methods, approx-neighbors, tiny)")
    parser.add_argument("--data", default="openclipart", choices=("openclipart", "synth"))
    parser.add_argument("--out", default=None, help="work folder (default: benchmarks/work/quality_<data>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the profile's seeds")
    parser.add_argument("--steps", type=int, default=None, help="override the profile's training steps")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="override the training precision")
    parser.add_argument("--settings", nargs="+", default=None, help="override the profile's settings")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the results JSON and markdown")
    parser.add_argument("--tag", default=None,
                        help="suffix of the result files (default: 'bf16' when training in bf16, else none)")
    parser.add_argument("--profiles-file", default=str(PROFILES_FILE))
    parser.add_argument("--no-report", action="store_true", help="skip clip_ping.report (plots) under OUT/report")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--stage-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage_worker:
        return stage_worker(args.stage_worker)

    started = time.perf_counter()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        prof = resolve_profile(args.profile, args.data, spec=load_profiles(Path(args.profiles_file)), seeds=args.seeds,
                               steps=args.steps, settings=args.settings, precision=args.precision)
        out = Path(args.out) if args.out else WORK / f"quality_{args.data}"
        out = out.resolve()
        plan = make_plan(prof, out)
        if args.dry_run:
            print(json.dumps({"profile": {k: prof[k] for k in ("name", "data_name", "seeds", "settings", "train",
                                                               "neighbor_k", "data_options")},
                              "data_dir": plan["data_dir"], "banks": plan["banks"],
                              "runs": [r["run_dir"] for r in plan["runs"]]}, indent=2, default=str))
            return 0
        out.mkdir(parents=True, exist_ok=True)
        state_dir = out / "stages"
        invocations = _read_json(out / "invocations.json") or []
        command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:]))
        invocations.append({"date": date, "command": command})
        (out / "invocations.json").write_text(json.dumps(invocations, indent=2))

        print(f"[quality] profile {prof['name']}, data {prof['data_name']}: {len(plan['runs'])} runs "
              f"({len(prof['settings'])} settings x {len(prof['seeds'])} seeds) into {out}", flush=True)
        with exclusive(state_dir / "prepare.lock", wait=False) as first:
            if not first:
                print("[quality] another invocation is preparing the data, banks or neighbours; waiting", flush=True)
        with exclusive(state_dir / "prepare.lock", wait=True):
            records = prepare(prof, plan, state_dir)
        t_train = time.perf_counter()
        elsewhere = train_and_evaluate(prof, plan, state_dir)
        train_wall = time.perf_counter() - t_train
        if elsewhere:
            print(f"[quality] {len(elsewhere)} runs were left to another invocation ({', '.join(elsewhere)}); "
                  "the results below lack them until this command runs again after it", flush=True)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume (finished work is kept)", file=sys.stderr)
        return 130

    results = collect(plan)
    agg = aggregate(results, prof["settings"])
    n_train = sum(1 for _ in open(Path(plan["data_dir"]) / "train.csv", encoding="utf-8")) - 1
    import torch

    doc = {
        "date": date,
        "commands": [i["command"] for i in invocations],
        "invocations": invocations,
        "profile": {k: prof[k] for k in ("name", "data_name", "data_options", "seeds", "settings", "setting_specs",
                                         "train", "eval", "extract", "neighbor_k", "image_teacher", "text_teacher",
                                         "choices")},
        "data_dir": plan["data_dir"],
        "n_train": n_train,
        "epochs_equivalent": (prof["train"].get("steps") or 0) * prof["train"]["batch_size"] / max(n_train, 1),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "notes": [
            "zero-shot: the data set's taxonomy tasks (dataset.json), class prompts averaged over its templates",
            "linear probe (test): logistic regression on frozen image features of up to "
            f"{prof['eval'].get('probe_max_train', 2000)} train images, C selected on val; on the val split the "
            "number shown is the probe's val accuracy at the C it selects (slightly optimistic)",
            "retrieval: over the distinct images of the split; a hit on any caption of an image counts",
        ],
        "results": results,
        "aggregate": agg,
        # the same paired deltas against the CLIP-PING defaults (key "delta_vs_clip" holds the delta to that baseline)
        "aggregate_vs_clip_ping": (aggregate(results, prof["settings"], baseline=SECOND_BASELINE)
                                   if SECOND_BASELINE in prof["settings"] else None),
        "recommendation": recommend(agg, prof),
        "cost": cost_summary(results, records, prof["settings"], prof["image_teacher"]),
        "neighbor_variants": {Path(v).name: {**spec, "top1_recall_vs_exact":
                                             (records.get(f"neighbors:{Path(v).name}") or {}).get("top1_recall_vs_exact")}
                              for v, spec in plan["neighbor_variants"].items()},
        "wall_seconds": time.perf_counter() - started,
        "train_and_eval_wall_seconds": train_wall,
    }
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag if args.tag is not None else ("bf16" if prof["train"]["precision"] == "bf16" else "")
    stem = f"quality_{prof['name']}_{prof['data_name']}" + (f"_{tag}" if tag else "")
    (results_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str))
    text = markdown(doc)
    (results_dir / f"{stem}.md").write_text(text, encoding="utf-8")
    if not args.no_report and results:
        try:
            from clip_ping.report import build_report

            done = [r for r in results]
            index = build_report([r["run_dir"] for r in done], out / "report", names=[r["setting"] for r in done])
            print(f"[quality] plots and comparison: {index}")
        except Exception as exc:  # the report is a convenience; the results are already written
            print(f"[quality] warning: clip_ping.report failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    print(text)
    print(f"[quality] results: {results_dir / (stem + '.json')} and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
