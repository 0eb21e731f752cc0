"""Combine result files of benchmarks/quality.py that ran different seeds of one profile.

    python benchmarks/quality_combine.py benchmarks/results/quality_quick_openclipart_v2-2seeds.json \\
        benchmarks/results/quality_quick_openclipart_v2-seed2.json --tag v2

On a shared 2-core machine the seeds of a profile may not fit one session; each
session runs some (``quality.py --seeds 2 --tag ...``) and this script pools
them into one table, with paired deltas over all seeds. It refuses files that
do not measure the same thing: another profile, data set, student, training
settings, teachers or evaluation, a run whose training config differs (paths
aside), or the same (setting, seed) twice. The inputs, with their commands,
dates and load averages, are listed in the output.

``--settings`` keeps only those settings of every file (CLIP among them), so a
setting too slow to run beside the others (A-CLIP-PING) can be pooled from
files that ran it with different companions.

``--assume KEY=VALUE`` fills a training key that a file does not name (in its
profile's ``train`` and in each run's config) with VALUE: for a key that was
made explicit after older files ran with it at its default then, e.g.
``--assume head=linear`` for the methods profile's seeds before 2026-12-02. A
file that names the key with another value is still refused. The assumption is
recorded in the output's notes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# What must be equal for two files to be seeds of one experiment (seeds themselves may differ).
PROFILE_KEYS = ("name", "data_name", "data_options", "settings", "setting_specs", "train", "eval", "extract",
                "neighbor_k", "image_teacher", "text_teacher")
PATH_KEYS = ("data", "banks", "seed")  # per-run config keys that differ between work folders or seeds


def _quality():
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CombineError(Exception):
    pass


def restrict(doc: dict[str, Any], settings: list[str], name: str) -> dict[str, Any]:
    """``doc`` with only the runs and profile entries of ``settings`` (each must be in it)."""
    missing = [s for s in settings if s not in doc["profile"]["settings"]]
    if missing:
        raise CombineError(f"{name} has no setting {', '.join(missing)} (it has {', '.join(doc['profile']['settings'])})")
    specs = {k: v for k, v in doc["profile"]["setting_specs"].items() if k in settings}
    return {**doc, "profile": {**doc["profile"], "settings": list(settings), "setting_specs": specs},
            "results": [r for r in doc["results"] if r["setting"] in settings]}


def assume(doc: dict[str, Any], assumed: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with each key of ``assumed`` that its profile's train keys, or a run's config, do not name set."""
    if not assumed:
        return doc
    train = {**assumed, **doc["profile"]["train"]}
    runs = [{**run, "config": {**assumed, **run["config"]}} for run in doc["results"]]
    return {**doc, "profile": {**doc["profile"], "train": train}, "results": runs}


def parse_assumptions(items: list[str]) -> dict[str, Any]:
    import yaml

    assumed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CombineError(f"--assume takes KEY=VALUE, got {item!r}")
        assumed[key] = yaml.safe_load(value)
    return assumed


def combine(docs: list[dict[str, Any]], names: list[str], settings: list[str] | None = None,
            assumed: dict[str, Any] | None = None) -> dict[str, Any]:
    """One result document from ``docs`` (quality.py JSON), recomputing every aggregate over all seeds;
    with ``settings``, over those settings only; ``assumed`` fills training keys a file does not name."""
    quality = _quality()
    docs = [assume(doc, assumed or {}) for doc in docs]
    if settings is not None:
        if quality.BASELINE not in settings:
            raise CombineError(f"--settings must include the baseline '{quality.BASELINE}'")
        docs = [restrict(doc, settings, name) for doc, name in zip(docs, names)]
    first = docs[0]
    for doc, name in zip(docs[1:], names[1:]):
        for key in PROFILE_KEYS:
            if doc["profile"].get(key) != first["profile"].get(key):
                raise CombineError(f"{name} and {names[0]} differ in profile key '{key}'; they are not seeds of one "
                                   "experiment")
        if doc.get("n_train") != first.get("n_train"):
            raise CombineError(f"{name} has {doc.get('n_train')} train pairs, {names[0]} {first.get('n_train')}")
    results, seen, config_of = [], {}, {}
    for doc, name in zip(docs, names):
        for run in doc["results"]:
            key = (run["setting"], run["seed"])
            if key in seen:
                raise CombineError(f"setting {key[0]} seed {key[1]} is in both {seen[key]} and {name}")
            seen[key] = name
            config = {k: v for k, v in run["config"].items() if k not in PATH_KEYS}
            if config_of.setdefault(run["setting"], config) != config:
                raise CombineError(f"setting {run['setting']} was trained with another config in {name}")
            results.append({**run, "source": name})
    results.sort(key=lambda r: (r["seed"], r["setting"]))
    settings = first["profile"]["settings"]
    profile = {**first["profile"], "seeds": sorted({r["seed"] for r in results})}
    agg = quality.aggregate(results, settings)
    sources = [{"file": name, "date": doc["date"], "commands": doc["commands"],
                "seeds": sorted({r["seed"] for r in doc["results"]}), "machine": doc["machine"],
                "wall_seconds": doc.get("wall_seconds")} for doc, name in zip(docs, names)]
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commands": [c for doc in docs for c in doc["commands"]],
        "combined_from": sources,
        "profile": profile,
        "data_dir": [doc.get("data_dir") for doc in docs],
        "n_train": first["n_train"],
        "epochs_equivalent": first["epochs_equivalent"],
        "machine": {**first["machine"],
                    "load_average_start": [s["machine"].get("load_average_start") for s in sources],
                    "load_average_end": [s["machine"].get("load_average_end") for s in sources]},
        "notes": list(first.get("notes", [])) + [
            "combined from " + "; ".join(f"{s['file']} (seeds {s['seeds']}, {s['date']})" for s in sources)
            + " with benchmarks/quality_combine.py; the load averages above are those of each source"] + (
            [f"assumed for files that do not name them: {assumed}"] if assumed else []),
        "results": results,
        "aggregate": agg,
        "aggregate_vs_clip_ping": (quality.aggregate(results, settings, baseline=quality.SECOND_BASELINE)
                                   if quality.SECOND_BASELINE in settings else None),
        "recommendation": quality.recommend(agg, profile),
        # the offline stages of the latest source (earlier ones built the same data and banks)
        "cost": quality.cost_summary(results, docs[-1]["cost"]["stages"], settings, profile["image_teacher"]),
        "wall_seconds": sum(s["wall_seconds"] or 0.0 for s in sources),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="quality.py result JSON files (two or more)")
    parser.add_argument("--tag", required=True, help="suffix of the combined files: quality_<profile>_<data>_<tag>")
    parser.add_argument("--settings", nargs="+", default=None,
                        help="keep only these settings of every file (clip among them); default: all, equal in every file")
    parser.add_argument("--assume", nargs="+", default=[], metavar="KEY=VALUE",
                        help="training keys a file does not name, taken as VALUE (e.g. head=linear)")
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="folder to write them into")
    args = parser.parse_args(argv)
    if len(args.files) < 2:
        parser.error("give two or more result files")
    try:
        docs = []
        for path in args.files:
            try:
                docs.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                raise CombineError(f"cannot read {path}: {exc}") from None
        doc = combine(docs, [str(p) for p in args.files], args.settings, parse_assumptions(args.assume))
    except CombineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stem = f"quality_{doc['profile']['name']}_{doc['profile']['data_name']}_{args.tag}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str))
    text = _quality().markdown(doc)
    (args.results / f"{stem}.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"[quality] combined results: {args.results / (stem + '.json')} and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
