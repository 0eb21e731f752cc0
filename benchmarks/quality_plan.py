"""Quality benchmark, part 1 of 5: the profiles (quality_profiles.yaml) and the plan of one invocation.

A profile is resolved (defaults, then the profile, then the command line's overrides) and
checked; the plan names every folder the invocation reads or writes: the data set, each bank
and neighbour table in use, and one run folder per (setting, seed). The script is
benchmarks/quality.py; the other parts: quality_prepare.py, quality_run.py,
quality_aggregate.py, quality_render.py.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


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
            if key not in ("teacher", "neighbors", "extract", "train_fraction") and key not in train_keys:
                raise BenchError(f"setting {s}: {key!r} is not a TrainConfig option")
        _check_train_fraction(s, over.get("train_fraction", 1.0))
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


def _check_train_fraction(setting: str, fraction: Any) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise BenchError(f"setting {setting}: 'train_fraction' takes a number in (0, 1], got {fraction!r}")


def _slug(options: dict[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(options.items()))


def neighbor_variant_dir(bank: Path, options: dict[str, Any]) -> Path:
    """The folder of a bank's second neighbour table: the bank's files linked, its own search."""
    return bank.parent / f"{bank.name}-nn-{_slug(options)}"


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


def bank_name_for(image_teacher: str, extract: dict[str, Any] | None = None, train_fraction: float = 1.0) -> str:
    """The key of a bank in the plan and in the stage records: the teacher, plus its own extraction options
    and the train subset it was built on."""
    name = f"{image_teacher}+{_slug(extract)}" if extract else image_teacher
    return name if train_fraction == 1 else f"{name}@{_subset_name(train_fraction)}"


# --------------------------------------------------------------------------- train subsets (the data curve)

SUBSET_SEED = 20261207  # the subsets' permutation: fixed, independent of every training seed


def _subset_name(fraction: float) -> str:
    return f"train{fraction * 100:g}pct"


def subset_dir_for(data_dir: Path, fraction: float) -> Path:
    """The data folder of a train subset, beside the full one: ``<data>-train<percent>pct``."""
    return data_dir.parent / f"{data_dir.name}-{_subset_name(fraction)}"


def subset_rows(n_rows: int, fraction: float, seed: int = SUBSET_SEED) -> list[int]:
    """The train rows of a ``fraction`` subset, in file order: the first ``round(fraction * n_rows)`` of one
    permutation of the rows seeded by ``seed`` alone. Every fraction takes a prefix of the same permutation,
    so the subsets are nested, and no training seed or method changes them."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(n_rows)
    return sorted(int(i) for i in order[:max(1, round(fraction * n_rows))])


def make_plan(prof: dict[str, Any], out: Path) -> dict[str, Any]:
    data_dir = data_dir_for(prof)
    default_teacher = prof["image_teacher"]
    banks: dict[str, str] = {}  # bank name (bank_name_for) -> folder
    bank_specs: dict[str, dict[str, Any]] = {}  # bank name -> its image teacher and extraction options
    variants: dict[str, dict[str, Any]] = {}  # second neighbour tables over a teacher's bank
    subsets: dict[str, float] = {}  # train-subset data folder -> its fraction (write_train_subset)
    runs = []
    # Seeds outer, settings inner: an interrupted benchmark has whole seeds, and runs
    # compared with each other are trained close in time (similar machine load).
    for seed in prof["seeds"]:
        for setting in prof["settings"]:
            over = dict(prof["setting_specs"][setting])
            teacher = over.pop("teacher", default_teacher)
            search = over.pop("neighbors", None)
            extract = over.pop("extract", None)
            fraction = float(over.pop("train_fraction", 1.0))
            train_data = data_dir if fraction == 1 else subset_dir_for(data_dir, fraction)
            if fraction != 1:
                subsets[str(train_data)] = fraction
            bank = bank_dir_for(train_data, teacher, default_teacher, extract)  # a subset's bank: its own rows only
            uses_bank = over.get("method", "clip-ping") not in NO_BANK_METHODS
            if uses_bank:
                name = bank_name_for(teacher, extract, fraction)
                banks.setdefault(name, str(bank))
                bank_specs.setdefault(name, {"image_teacher": teacher, "data": str(train_data),
                                             "extract": {**prof["extract"], **(extract or {})}})
                if search:
                    variant = neighbor_variant_dir(bank, search)
                    variants[str(variant)] = {"source": str(bank), "teacher": teacher, "options": dict(search)}
                    bank = variant
            run_dir = out / "runs" / f"{setting}-seed{seed}"
            train = {**prof["train"], **over, "data": str(train_data), "out": str(run_dir), "seed": seed,
                     "resume": "auto", "tensorboard": False, "progress": sys.stderr.isatty(),
                     "banks": str(bank) if uses_bank else None}
            # evaluated on the full data set's splits (the linear probe fits on its train rows), whatever it trained on
            runs.append({"setting": setting, "seed": seed, "run_dir": str(run_dir), "teacher": teacher,
                         "train_fraction": fraction, "eval_data": str(data_dir), "train": train})
    return {"data_dir": str(data_dir), "banks": banks, "bank_specs": bank_specs, "neighbor_variants": variants,
            "subsets": subsets, "runs": runs}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in BOOKKEEPING}
