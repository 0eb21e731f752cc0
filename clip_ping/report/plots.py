"""Plots of `clip-ping report`: training curves per logged term, headline metrics as bars.

Both take the report's settings (runs grouped by seed) or its aggregated results
and write a PNG with matplotlib's Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .runs import Setting

_DIRECTIONS = {"image_to_text": "image→text", "text_to_image": "text→image"}

CURVE_TITLES = {"lr": "learning rate", "loss": "total loss", "loss_clip": "L_clip (image-text)",
                "loss_nn": "L_nn (neighbours, same modality)", "loss_xnn": "L_xnn (neighbours, cross-modal)"}


def _curve_keys(settings: Sequence[Setting]) -> list[str]:
    """Every loss term logged by any run, then logit scale(s) and learning rate."""
    keys: list[str] = []
    for setting in settings:
        for run in setting.runs:
            for record in run.history:
                keys += [k for k in record if k not in keys and isinstance(record[k], (int, float))]
    losses = sorted((k for k in keys if k.startswith("loss")), key=lambda k: (k != "loss", k))
    extra = [k for k in keys if k.startswith("logit_scale")] + [k for k in ("lr",) if k in keys]
    return losses + extra


def _y_label(key: str) -> str:
    if key.startswith("loss"):
        return "loss (nats)"  # InfoNCE is a cross-entropy with natural logarithms
    if key.startswith("logit_scale"):
        return "logit scale 1/τ"
    return "learning rate"


def _marker(n_points: int) -> str | None:
    # A short log (one or two records) would be invisible as a bare line.
    return "o" if n_points < 20 else None


def plot_training_curves(settings: Sequence[Setting], path: Path) -> bool:
    """One panel per logged term; a setting's seeds are averaged (band: ± std). False when nothing was logged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = _curve_keys(settings)
    if not keys:
        return False
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i}" for i in range(10)]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, setting in enumerate(settings):
            series = [{int(r["step"]): float(r[key]) for r in run.history if isinstance(r.get(key), (int, float))}
                      for run in setting.runs]
            series = [s for s in series if s]
            if not series:
                continue
            color = colors[j % len(colors)]
            common = sorted(set.intersection(*(set(s) for s in series)))
            if len(series) > 1 and common:
                values = np.array([[s[t] for t in common] for s in series])
                mean, std = values.mean(axis=0), values.std(axis=0, ddof=1)
                ax.plot(common, mean, color=color, marker=_marker(len(common)),
                        label=f"{setting.name} (mean of {len(series)})")
                ax.fill_between(common, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
            else:
                for k, s in enumerate(series):
                    steps = sorted(s)
                    ax.plot(steps, [s[t] for t in steps], color=color, alpha=1.0 if k == 0 else 0.6, marker=_marker(len(steps)),
                            label=setting.name if k == 0 else None)
        ax.set_title(CURVE_TITLES.get(key, key.replace("_", " ")), fontsize=11)
        ax.set_xlabel("training step")
        ax.set_ylabel(_y_label(key))
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # "1e-5 + 14.28" offsets are hard to read
        ax.legend(fontsize=8)
    fig.suptitle("Training curves (shaded: ± std over seeds)", fontsize=13)
    fig.savefig(path, dpi=110)
    return True


def headline_keys(results: dict[str, Any]) -> list[str]:
    """Top-1 zero-shot per task, R@1 and R@5 both ways, linear probe accuracy per task."""
    keys = list(results["metrics"])
    pick = [k for k in keys if re.fullmatch(r"zeroshot/[^/]+/top1", k)]
    pick += [k for k in keys if re.fullmatch(r"retrieval/(image_to_text|text_to_image)/R@(1|5)", k)]
    pick += [k for k in keys if re.fullmatch(r"linear_probe/[^/]+/accuracy", k)]
    return pick


def _bar_label(key: str) -> str:
    """Axis label of a headline metric (the unit is on the y axis)."""
    parts = key.split("/")
    if parts[0] == "zeroshot":
        return f"zero-shot {parts[1]} top-1"
    if parts[0] == "linear_probe":
        return f"linear probe {parts[1]}"
    return f"{_DIRECTIONS.get(parts[1], parts[1])} {parts[2]}"


def plot_metric_bars(results: dict[str, Any], path: Path) -> bool:
    """Grouped bars of the headline metrics, error bars ± std over seeds. False when there is no metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = headline_keys(results)
    if not keys:
        return False
    names = [s["name"] for s in results["settings"]]
    width = 0.8 / len(names)
    fig = Figure(figsize=(max(6.0, 1.1 * len(keys) * max(1, len(names)) ** 0.5 + 2), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(keys))
    for j, name in enumerate(names):
        stats = [results["metrics"][k]["settings"].get(name) for k in keys]
        means = [s["mean"] if s else np.nan for s in stats]
        errors = [(s["std"] or 0.0) if s else 0.0 for s in stats]
        n = max((s["n"] for s in stats if s), default=1)
        bars = ax.bar(x + (j - (len(names) - 1) / 2) * width, means, width, yerr=errors, capsize=3,
                      label=f"{name} (n={n})", color=f"C{j % 10}")
        ax.bar_label(bars, labels=[f"{m:.1f}" if np.isfinite(m) else "" for m in means], fontsize=7, padding=2)
    ax.set_xticks(x, [_bar_label(k) for k in keys], rotation=30, ha="right", fontsize=9)
    ax.set_ylabel("accuracy / recall (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title("Headline metrics (mean ± std over seeds)")
    fig.savefig(path, dpi=110)
    return True
