"""Shared helpers of the training and loader benchmarks.

- `prepare_data`: the built-in synthetic data set, its feature banks (real default
  teachers) and neighbour tables, made once and cached under ``benchmarks/work/``;
- `interleaved`: A/B(/C...) timing, one call of each in turn (ABAB...), warm-up
  calls discarded, so a machine whose load drifts slows every side alike;
- `revision_tree`: a git revision checked out beside this tree, for A/B runs of two versions;
- `machine_facts`, `write_json`, `print_table`.

The machine this runs on is usually shared, so absolute numbers are noisy;
ratios measured within one process, interleaved, are what to compare.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
WORK = BENCH_DIR / "work"
RESULTS = BENCH_DIR / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench")


def revision_tree(rev: str) -> Path:
    """A git worktree of revision ``rev`` under ``benchmarks/work/revisions/`` (made once), to run its code
    beside this tree's with the same Python environment."""
    import subprocess

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    tree = WORK / "revisions" / commit
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True)
    return tree


# --------------------------------------------------------------------------- machine, output


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_facts() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg_start": load_average(),
    }
    try:
        import open_clip

        facts["open_clip"] = open_clip.__version__
    except Exception:  # pragma: no cover - informative only
        pass
    return facts


def write_json(name: str, result: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json (the load average at the end is added)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result.setdefault("machine", machine_facts())
    result["machine"]["load_avg_end"] = load_average()
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], title: str | None = None) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


# --------------------------------------------------------------------------- timing


def interleaved(fns: dict[str, Callable[[int], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call each function in turn (ABAB...), ``warmup + repeats`` rounds; return the kept seconds per name.

    ``fn(i)`` gets the round number (e.g. to pick batch i). The order inside a round
    alternates (AB, BA, AB...) so neither side always runs right after the other.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            fns[n](r)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
    return times


def stats(seconds: Sequence[float]) -> dict[str, float]:
    s = list(seconds)
    if not s:
        return {"n": 0}
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"n": len(s), "median": statistics.median(s), "mean": statistics.fmean(s),
            "min": min(s), "max": max(s), "q1": q[0], "q3": q[2]}


# --------------------------------------------------------------------------- data


def prepare_data(n_train: int, k: int = 10, image_size: int = 64, progress: bool = False) -> Path:
    """Synthetic data set of ``n_train`` pairs with banks (default teachers) and neighbours, cached.

    ``benchmarks/work/synth-<n>/`` holding ``train.csv`` ... and ``banks/``
    (the trainer's default bank folder). Every stage keeps an up-to-date result.
    """
    from clip_ping.banks import ExtractConfig, extract_banks
    from clip_ping.data.synth import SynthConfig, generate_synthetic
    from clip_ping.knn import NeighborsConfig, build_neighbors

    data = WORK / f"synth-{n_train}"
    t0 = time.perf_counter()
    generate_synthetic(SynthConfig(out=str(data), seed=0, n_train=n_train, n_val=min(200, n_train // 4),
                                   n_test=min(200, n_train // 4), image_size=image_size), progress=progress)
    t1 = time.perf_counter()
    banks = data / "banks"
    extract_banks(ExtractConfig(data=str(data / "train.csv"), out=str(banks), progress=progress))
    t2 = time.perf_counter()
    try:  # reuse any table that still matches this bank (settings checks change between versions)
        from clip_ping.knn import load_neighbors

        if load_neighbors(banks).k < k:
            raise ValueError("too few neighbours")
    except Exception:
        build_neighbors(NeighborsConfig(banks=str(banks), k=k, progress=progress, overwrite=True))
    t3 = time.perf_counter()
    if t3 - t0 > 1:
        print(f"[data] {data}: synth {t1 - t0:.1f} s, banks {t2 - t1:.1f} s, neighbours {t3 - t2:.1f} s", flush=True)
    return data


def absolute_csv(csv_path: Path, out: Path) -> Path:
    """A copy of a pairs CSV with absolute image paths (open_clip_train reads paths as given)."""
    root = csv_path.parent.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, newline="", encoding="utf-8") as f, open(out, "w", newline="", encoding="utf-8") as g:
        reader = csv.reader(f)
        writer = csv.writer(g, lineterminator="\n")
        header = next(reader)
        col = header.index("filepath")
        writer.writerow(header)
        for row in reader:
            row[col] = str((root / row[col]).resolve())
            writer.writerow(row)
    return out


def quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
