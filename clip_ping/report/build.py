"""`clip-ping report`: compare training runs side by side.

Input: run folders as the trainer writes them (``config.yaml``,
``metrics.jsonl``, ``eval.json``). Runs whose configs differ only in the seed
(and in bookkeeping such as the output folder) are one *setting*; a setting
with several seeds is reported as mean ± standard deviation over its seeds.

Output folder::

    report.md            tables: every metric (rows) x setting (columns),
                         plus "B - A" when there are exactly two settings
    results.json         the same numbers, unrounded, with the per-seed values
    training_curves.png  every loss term (and logit scale, lr) against the step
    metrics_bar.png      headline metrics with error bars over seeds
    index.html           all of the above on one page, with relative links to the runs
                         and to neighbour pages (``neighbors.html``): the report folder's
                         own (``clip-ping demo`` writes one there), and the runs' bank folders

Run folders are read and grouped into settings by ``runs``; the plots are
in ``plots``; the metrics, their tables and the pages are here.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..config import Config, option
from ..errors import ConfigError
from ..io import atomic_write_text, claim_folder
from .plots import plot_metric_bars, plot_training_curves
from .runs import Run, Setting, group_runs, load_run, setting_config

log = logging.getLogger(__name__)

# eval.json leaves that are counts, settings or timings rather than metrics.
NOT_METRICS = {"n", "n_images", "n_texts", "n_train", "n_val", "n_test", "n_classes", "n_unknown_label",
               "n_undecodable_images", "coverage", "seconds", "C", "converged", "val_accuracy_by_C"}
NEIGHBOR_PAGE = "neighbors.html"


@dataclass
class ReportConfig(Config):
    runs: list[str] = option([], "run folders to compare (each with config.yaml, metrics.jsonl, eval.json)",
                             positional=True)
    out: str = option("runs/report", "folder to write the report into")
    names: list[str] = option([], "one setting name per run folder; runs with the same name are seeds of one setting "
                                   "(default: named from their configs)")

    def validate(self) -> None:
        if not self.runs:
            raise ConfigError("config key 'runs': give at least one run folder")


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricInfo:
    key: str               # path in eval.json, e.g. "zeroshot/color/top1"; "train/..." for the log
    label: str             # row label in the tables
    group: str             # table it belongs to
    unit: str              # "%", "" ...
    higher_is_better: bool


_DIRECTIONS = {"image_to_text": "image→text", "text_to_image": "text→image"}


def _describe(path: tuple[str, ...]) -> MetricInfo:
    """Readable label, table and direction of an eval.json leaf."""
    key = "/".join(path)
    if path[0] == "teacher_reference" and len(path) > 1:
        inner = _describe(path[1:])
        return MetricInfo(key, f"teachers: {inner.label}", "Teacher reference (frozen teachers)", inner.unit,
                          inner.higher_is_better)
    head, leaf = path[0], path[-1]
    if head == "zeroshot" and len(path) == 4 and path[2] == "per_class":
        return MetricInfo(key, f"{path[1]}: {leaf}", "Zero-shot accuracy per class (top-1, %)", "%", True)
    if head == "zeroshot" and len(path) == 3:
        name = {"top1": "top-1", "top5": "top-5", "mean_per_class": "mean per-class"}.get(leaf, leaf)
        return MetricInfo(key, f"{path[1]} {name}", "Zero-shot classification (%)", "%", True)
    if head == "retrieval" and len(path) == 3:
        direction = _DIRECTIONS.get(path[1], path[1])
        if leaf.endswith("rank"):
            return MetricInfo(key, f"{direction} {leaf.replace('_', ' ')}", "Retrieval", "", False)
        return MetricInfo(key, f"{direction} {leaf} (%)", "Retrieval", "%", True)
    if head == "linear_probe" and len(path) == 3:
        name = {"accuracy": "test accuracy", "val_accuracy": "val accuracy (selects C)"}.get(leaf, leaf)
        return MetricInfo(key, f"{path[1]} {name}", "Linear probe (%)", "%", True)
    return MetricInfo(key, " ".join(path), "Other", "", True)


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], float]]:
    """Numeric leaves of a nested dict, skipping counts and settings."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if str(k) not in NOT_METRICS:
                yield from _leaves(v, prefix + (str(k),))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and prefix:
        yield prefix, float(tree)


def run_metrics(run: Run) -> dict[str, tuple[MetricInfo, float]]:
    """Every metric of one run: its eval.json leaves, and the last logged training values."""
    metrics = {}
    for path, value in _leaves(run.eval or {}):
        info = _describe(path)
        metrics[info.key] = (info, value)
    if run.history:
        last = run.history[-1]
        for name, value in last.items():
            if name.startswith("loss") and isinstance(value, (int, float)):
                info = MetricInfo(f"train/{name}", f"{name} (final)", "Training (last logged step)", "", False)
                metrics[info.key] = (info, float(value))
        speeds = [r["samples_per_s"] for r in run.history if isinstance(r.get("samples_per_s"), (int, float))]
        if speeds:
            info = MetricInfo("train/samples_per_s", "throughput (samples/s, mean)", "Training (last logged step)", "", True)
            metrics[info.key] = (info, float(np.mean(speeds)))
    return metrics


def seed_stats(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1 denominator; None for a single seed)."""
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            "n": len(arr), "values": [float(v) for v in arr]}


def aggregate(settings: Sequence[Setting]) -> dict[str, Any]:
    """results.json content: per metric, per setting mean/std/n/values, and the two-setting delta."""
    infos: dict[str, MetricInfo] = {}
    values: dict[str, dict[str, list[float]]] = {}
    for setting in settings:
        for run in setting.runs:
            for key, (info, value) in run_metrics(run).items():
                if not math.isfinite(value):
                    continue
                infos.setdefault(key, info)
                values.setdefault(key, {}).setdefault(setting.name, []).append(value)
    metrics = {}
    for key, info in infos.items():
        per_setting = {name: seed_stats(vals) for name, vals in values[key].items()}
        delta = None
        if len(settings) == 2 and all(s.name in per_setting for s in settings):
            delta = per_setting[settings[1].name]["mean"] - per_setting[settings[0].name]["mean"]
        metrics[key] = {"label": info.label, "group": info.group, "unit": info.unit,
                        "higher_is_better": info.higher_is_better, "settings": per_setting, "delta": delta}
    return {
        "settings": [{"name": s.name, "runs": [str(r.path) for r in s.runs], "seeds": s.seeds,
                      "config": setting_config(s.runs[0])} for s in settings],
        "std": "sample standard deviation over seeds (n - 1 denominator)",
        "delta": f"{settings[1].name} - {settings[0].name}" if len(settings) == 2 else None,
        "metrics": metrics,
    }


# --------------------------------------------------------------------------- tables

GROUP_ORDER = ["Zero-shot classification (%)", "Retrieval", "Linear probe (%)", "Teacher reference (frozen teachers)",
               "Training (last logged step)",
               "Zero-shot accuracy per class (top-1, %)", "Other"]


def format_value(value: float, key: str) -> str:
    """Fixed decimals: 4 for losses (small numbers), 2 for everything else."""
    return f"{value:.4f}" if key.startswith("train/loss") else f"{value:.2f}"


def _cell(stats: dict[str, Any] | None, key: str) -> str:
    if stats is None:
        return "–"
    text = format_value(stats["mean"], key)
    return f"{text} ± {format_value(stats['std'], key)}" if stats["std"] is not None else text


def _table_rows(results: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """(group, rows) with cells as strings; the first row of each group is the header."""
    names = [s["name"] for s in results["settings"]]
    n_seeds = {s["name"]: len(s["runs"]) for s in results["settings"]}
    header = ["metric"] + [f"{n} (n={n_seeds[n]})" for n in names]
    if results["delta"]:
        header.append(f"Δ {results['delta']}")
    by_group: dict[str, list[tuple[bool, list[str]]]] = {}
    for key, m in results["metrics"].items():
        arrow = "↑" if m["higher_is_better"] else "↓"
        row = [f"{m['label']} {arrow}"] + [_cell(m["settings"].get(n), key) for n in names]
        if results["delta"]:
            row.append("–" if m["delta"] is None else ("+" if m["delta"] >= 0 else "-") + format_value(abs(m["delta"]), key))
        by_group.setdefault(m["group"], []).append((key == "train/samples_per_s", row))
    ordered = sorted(by_group, key=lambda g: GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER))
    # Stable sort: losses stay in logged order, throughput goes last.
    return [(g, [header] + [row for _, row in sorted(by_group[g], key=lambda item: item[0])]) for g in ordered]


def _markdown(results: dict[str, Any], images: Sequence[str], own_neighbor_page: bool = False) -> str:
    lines = ["# clip-ping report", ""]
    for s in results["settings"]:
        seeds = ", ".join("?" if x is None else str(x) for x in s["seeds"])
        lines.append(f"- **{s['name']}**: {len(s['runs'])} run(s), seed(s) {seeds}")
    if own_neighbor_page:
        lines += ["", f"What the guidance pulls toward: [neighbour page]({NEIGHBOR_PAGE})"]
    lines += ["", "Cells are mean ± sample standard deviation over seeds (a single seed shows its value). "
              "↑ higher is better, ↓ lower is better."
              + (f" Δ is {results['delta']} (difference of the means)." if results["delta"] else ""), ""]
    for group, rows in _table_rows(results):
        lines += [f"## {group}", "", "| " + " | ".join(rows[0]) + " |",
                  "|" + "---|" + "---:|" * (len(rows[0]) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        lines.append("")
    if any(key.startswith("train/loss") for key in results["metrics"]):
        lines += ["Training losses are in nats. The total `loss` includes the weighted NN and XNN terms only "
                  "when their lambdas are non-zero, so compare `loss_clip` across methods.", ""]
    for image in images:
        lines += [f"![{image}]({image})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- html


def neighbor_pages(run: Run) -> list[Path]:
    """neighbors.html pages that belong to a run: in its folder, or in its bank folder."""
    candidates = [run.path / NEIGHBOR_PAGE, run.path / "banks" / NEIGHBOR_PAGE]
    if run.config.get("banks"):
        candidates.append(Path(str(run.config["banks"])) / NEIGHBOR_PAGE)
    elif run.config.get("data"):
        data = Path(str(run.config["data"]))
        candidates.append((data if data.is_dir() else data.parent) / "banks" / NEIGHBOR_PAGE)
    found: list[Path] = []
    for c in candidates:
        if c.is_file() and c.resolve() not in found:
            found.append(c.resolve())
    return found


def report_neighbor_pages(settings: Sequence[Setting], out_dir: Path) -> list[Path]:
    """The report folder's own neighbours.html (where `clip-ping demo` writes it), then the runs' pages."""
    own = out_dir / NEIGHBOR_PAGE
    pages = [own.resolve()] if own.is_file() else []
    for setting in settings:
        for run in setting.runs:
            pages += [p for p in neighbor_pages(run) if p not in pages]
    return pages


def _page_label(page: Path, out_dir: Path) -> str:
    return "neighbour page" if page.parent == out_dir.resolve() else f"{page.parent.name}/{page.name}"


def _html(results: dict[str, Any], settings: Sequence[Setting], images: Sequence[str], out_dir: Path) -> str:
    esc = html.escape

    def link(target: Path, text: str) -> str:
        # relative (the folder can be moved with its runs), in URL form (spaces, '#' in folder names)
        rel = os.path.relpath(Path(target).resolve(), out_dir.resolve()).replace(os.sep, "/")
        return f'<a href="{esc(urllib.parse.quote(rel))}">{esc(text)}</a>'

    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8"><title>clip-ping report</title>',
             "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;margin-bottom:1.5em}th,td{border:1px solid #ccc;padding:4px 10px}"
             "td{text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}</style></head><body>",
             "<h1>clip-ping report</h1>", "<h2>Settings</h2>", "<ul>"]
    for setting in settings:
        runs = ", ".join(link(r.path, r.path.name) + f" (seed {esc(str(r.seed))})" for r in setting.runs)
        parts.append(f"<li><b>{esc(setting.name)}</b>: {runs}</li>")
    parts.append("</ul>")
    pages = report_neighbor_pages(settings, out_dir)
    if pages:
        parts += ["<h2>What the guidance pulls toward</h2>",
                  "<p>CLIP-PING pulls each image and caption toward its nearest neighbours in the frozen teachers' "
                  "feature banks. The neighbour page shows random samples beside those neighbours, and how often a "
                  "neighbour shares the sample's labels: "
                  + ", ".join(link(p, _page_label(p, out_dir)) for p in pages) + "</p>"]
    parts += ["<p>Cells are mean ± sample standard deviation over seeds. ↑ higher is better, ↓ lower is better."
              + (f" Δ is {esc(results['delta'])}." if results["delta"] else "") + "</p>"]
    for image in images:
        parts.append(f'<img src="{esc(image)}" alt="{esc(image)}">')
    for group, rows in _table_rows(results):
        parts += [f"<h2>{esc(group)}</h2>", "<table>",
                  "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in rows[0]) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows[1:]]
        parts.append("</table>")
    parts += ['<p>Files: <a href="report.md">report.md</a>, <a href="results.json">results.json</a></p>',
              "</body></html>"]
    return "\n".join(parts)


# --------------------------------------------------------------------------- entry points


REPORT_FILES = ("results.json", "report.md", "index.html", "training_curves.png", "metrics_bar.png")


def legacy_report_files(out_dir: Path) -> list[str] | None:
    """The files of a report an earlier clip-ping wrote (None: not one): results.json beside report.md and
    index.html."""
    if not all((out_dir / name).is_file() for name in REPORT_FILES[:3]):
        return None
    try:
        json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return [name for name in REPORT_FILES if (out_dir / name).is_file()]


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path, names: Sequence[str] | None = None) -> Path:
    """Write the report of ``run_dirs`` into ``out_dir``; returns the path of its index.html.

    ``names`` gives a setting name per run folder (same name = seeds of one setting);
    without it, runs are grouped by their config minus seed and bookkeeping keys.
    """
    if not run_dirs:
        raise ConfigError("report: give at least one run folder")
    runs = [load_run(p) for p in run_dirs]
    settings = group_runs(runs, names)
    out_dir = Path(out_dir)
    # a report's folder: empty, a report of clip-ping's, or one holding only the neighbour page clip-ping wrote
    claim = claim_folder(out_dir, "report", joins=("neighbour page",), legacy=legacy_report_files)
    claim.files(REPORT_FILES)

    results = aggregate(settings)
    images = []
    if plot_training_curves(settings, out_dir / "training_curves.png"):
        images.append("training_curves.png")
    if plot_metric_bars(results, out_dir / "metrics_bar.png"):
        images.append("metrics_bar.png")
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, default=str))
    own_page = (out_dir / NEIGHBOR_PAGE).is_file()
    atomic_write_text(out_dir / "report.md", _markdown(results, images, own_page))
    index = out_dir / "index.html"
    atomic_write_text(index, _html(results, settings, images, out_dir))
    log.info("report written to %s", index)
    return index


def report_from_config(cfg: ReportConfig) -> dict[str, Any]:
    index = build_report(cfg.runs, cfg.out, cfg.names or None)
    return {"report": str(index), "markdown": str(index.parent / "report.md"),
            "results": str(index.parent / "results.json")}
