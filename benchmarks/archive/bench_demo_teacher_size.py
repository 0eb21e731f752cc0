"""Does the image teacher at a smaller input size keep CLIP-PING's gain in the demo?

The built-in data is 64 px and EfficientNet-Lite0 upsamples it to 224 px, so most of
the demo's extraction is spent on pixels that are not there. A smaller
``--teacher-image-size`` is another teacher, not a faster copy (its neighbours
differ), so what counts is the trained result: this script runs the demo's setting
(its data, student, epochs, precision and batch) for plain CLIP and for CLIP-PING on
banks extracted at each teacher size, on the same seeds, evaluates every run on the
test split, and prints the headline metrics (mean ± std over seeds) with the
extraction time of each bank.

    .venv/bin/python benchmarks/archive/bench_demo_teacher_size.py --sizes 224 128 96 --seeds 0 1 2

Runs are kept under ``benchmarks/work/demo-teacher-size/`` and a finished run is not
trained again (delete the folder to start over). Results:
``benchmarks/results/demo_teacher_size.json`` and a report (``build_report``) beside the runs.

Finished: it chose the demo's 96 px teacher (commit 68b37c0); its result stays in
benchmarks/results/demo_teacher_size.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
from _common import WORK, machine_facts, print_table, write_json

from clip_ping.banks import ExtractConfig, extract_banks
from clip_ping.data.synth import SynthConfig, generate_synthetic
from clip_ping.demo import DemoConfig, demo_run_config, train_and_evaluate, train_precision
from clip_ping.knn import NeighborsConfig, build_neighbors
from clip_ping.report import build_report
from clip_ping.training.trainer import TrainConfig

HEADLINE = ("zeroshot/shape/top1", "zeroshot/color/top1", "zeroshot/count/top1",
            "retrieval/image_to_text/R@1", "retrieval/text_to_image/R@1")  # paths into eval.json, percent


def make_banks(data_dir: Path, size: int | None, demo: DemoConfig) -> tuple[Path, float]:
    bank_dir = data_dir / f"banks-{size or 'own'}"
    started = time.perf_counter()
    extract_banks(ExtractConfig(data=str(data_dir / "train.csv"), out=str(bank_dir), teacher_image_size=size,
                                workers=demo.workers, progress=False))
    build_neighbors(NeighborsConfig(banks=str(bank_dir), k=demo.neighbor_k, progress=False))
    return bank_dir, time.perf_counter() - started


def train_and_eval(run_dir: Path, method: str, seed: int, data_dir: Path, bank_dir: Path,
                   demo: DemoConfig) -> dict[str, float]:
    """One run as the demo trains and evaluates it (a run stopped by Ctrl-C is not evaluated); its headline metrics."""
    precision = train_precision(demo.precision, TrainConfig.device)
    train_and_evaluate(demo_run_config(demo, method, seed, data_dir, bank_dir, run_dir, precision, demo.workers,
                                       progress=False), data_dir, demo.workers)
    result = json.loads((run_dir / "eval.json").read_text())
    return {key: float(_at(result, key)) for key in HEADLINE}


def _at(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("/"):
        tree = tree[part]
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 128, 96],
                    help="teacher input sides in pixels (224 is EfficientNet-Lite0's own)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="demo_teacher_size")
    args = ap.parse_args()

    demo = DemoConfig()
    work = WORK / "demo-teacher-size"
    data_dir = work / "data"
    facts = machine_facts()
    generate_synthetic(SynthConfig(out=str(data_dir), seed=demo.data_seed, n_train=demo.n_train, n_val=demo.n_val,
                                   n_test=demo.n_test, image_size=demo.image_size))
    banks: dict[str, Path] = {}
    extract_seconds: dict[str, float] = {}
    for size in args.sizes:
        name = f"clip-ping-t{size}"
        banks[name], extract_seconds[name] = make_banks(data_dir, None if size == 224 else size, demo)
        print(f"{name}: banks and neighbours in {extract_seconds[name]:.1f} s", flush=True)

    # plain CLIP reads no bank; the demo gives it the bank folder all the same
    settings: dict[str, tuple[str, Path]] = {"clip": ("clip", next(iter(banks.values())))}
    settings.update({name: ("clip-ping", bank) for name, bank in banks.items()})
    per_seed: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    run_dirs, names = [], []
    for seed in args.seeds:
        for name, (method, bank_dir) in settings.items():
            run_dir = work / "runs" / f"{name}-seed{seed}"
            per_seed[name].append(train_and_eval(run_dir, method, seed, data_dir, bank_dir, demo))
            run_dirs.append(run_dir)
            names.append(name)
            print(f"{run_dir.name}: {per_seed[name][-1]}", flush=True)
    build_report(run_dirs, work / "report", names=names)

    summary: dict[str, Any] = {}
    rows = []
    for name, results in per_seed.items():
        summary[name] = {}
        row: list[Any] = [name]
        for key in HEADLINE:
            values = [r[key] for r in results]
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name][key] = {"mean": mean, "std": std, "per_seed": values}
            row.append(f"{mean:.2f} ± {std:.2f}")
        row.append(f"{extract_seconds[name]:.1f}" if name in extract_seconds else "-")
        rows.append(row)
    print_table(rows, ["setting", *HEADLINE, "banks s"],
                title=f"test split, seeds {args.seeds}, mean ± std (percent)")
    path = write_json(args.out, {"machine": facts, "seeds": args.seeds, "sizes": args.sizes,
                                 "extract_and_neighbors_seconds": extract_seconds, "metrics": summary,
                                 "demo": {k: getattr(demo, k) for k in ("n_train", "n_test", "image_size", "epochs")}})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
