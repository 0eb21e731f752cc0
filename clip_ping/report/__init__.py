"""`clip-ping report`: compare training runs side by side.

One job per module:

- `runs`   run folders read and grouped into settings (runs that differ only in the seed)
- `plots`  the training curves and the bar charts
- `build`  the metrics, their tables and the pages (`ReportConfig`, `build_report`)

The public names are re-exported here, so ``from clip_ping.report import X`` works.
"""

from .build import (
    GROUP_ORDER,
    NEIGHBOR_PAGE,
    NOT_METRICS,
    MetricInfo,
    ReportConfig,
    aggregate,
    build_report,
    format_value,
    neighbor_pages,
    report_from_config,
    report_neighbor_pages,
    run_metrics,
    seed_stats,
)
from .plots import plot_metric_bars, plot_training_curves
from .runs import Run, Setting, group_runs, load_run, setting_config

__all__ = [
    "GROUP_ORDER", "NEIGHBOR_PAGE", "NOT_METRICS", "MetricInfo", "ReportConfig", "Run", "Setting",
    "aggregate", "build_report", "format_value", "group_runs", "load_run", "neighbor_pages", "plot_metric_bars",
    "plot_training_curves", "report_from_config", "report_neighbor_pages", "run_metrics", "seed_stats", "setting_config",
]
