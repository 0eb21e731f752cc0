"""The README's bar chart: a quality benchmark's results drawn by the demo's report code.

`clip-ping report` (and so `make demo`) draws ``metrics_bar.png`` from its runs' evaluations;
this script draws the same chart from a ``benchmarks/quality.py`` results file, test split,
mean ± std over seeds, so the README shows the headline benchmark in the demo's picture:

    python benchmarks/headline_chart.py \
        benchmarks/results/quality_bank-precision_openclipart_bank-precision.json \
        --settings clip clip-ping --out docs/img/openclipart_clip_vs_clip_ping.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from clip_ping.report import seed_stats
from clip_ping.report.plots import plot_metric_bars

# quality.py's metric names -> the report's (what plot_metric_bars picks its headline metrics by)
_PREFIXES = {"zs/": "zeroshot/", "i2t/": "retrieval/image_to_text/", "t2i/": "retrieval/text_to_image/",
             "probe/": "linear_probe/"}


def report_key(name: str) -> str | None:
    """The report's key of a quality.py metric name, or None for a metric the report has no key for (score)."""
    for prefix, replacement in _PREFIXES.items():
        if name.startswith(prefix):
            key = replacement + name[len(prefix):]
            return key + "/accuracy" if prefix == "probe/" else key
    return None


def results_for_chart(quality: dict[str, Any], settings: list[str], split: str = "test") -> dict[str, Any]:
    """The report's results dict (settings, per-metric seed statistics) of ``settings``' runs on ``split``."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in quality["results"]:
        if run["setting"] not in settings:
            continue
        for name, value in run["metrics"][split].items():
            key = report_key(name)
            if key is not None:
                values.setdefault(key, {}).setdefault(run["setting"], []).append(float(value))
    missing = [s for s in settings if not any(s in per for per in values.values())]
    if missing:
        raise SystemExit(f"no {split} results for setting(s) {', '.join(missing)} in this file")
    return {"settings": [{"name": s} for s in settings],
            "metrics": {key: {"settings": {s: seed_stats(v) for s, v in per.items()}} for key, per in values.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a benchmarks/quality.py results file (.json)")
    parser.add_argument("--settings", nargs="+", default=["clip", "clip-ping"], help="settings to draw, in order")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    results = results_for_chart(json.loads(args.results.read_text()), args.settings, args.split)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_metric_bars(results, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
