"""The package re-layout changed no number: one quality run before the move and one after, compared.

Each tree (a checkout before the move, and one after) ran, at equal seed:

    python benchmarks/quality.py --profile tiny --data synth --seeds 0 --settings clip clip-ping queue \\
        --out TREE/work --results TREE/res --no-report

and this script compares what the two wrote: the data set's files, the teacher banks and neighbour
tables (every .npy and .csv, by SHA-256), each run's logged training metrics (every line of
metrics.jsonl but its throughput) and its evaluation (eval.json, eval_val.json, without paths and times):

    python benchmarks/archive/layout_move_check.py BEFORE_TREE AFTER_TREE \\
        --out benchmarks/results/layout_move_check.json --note "..."

It exits 1 when anything differs. Finished: the move is on main; the result is kept in
benchmarks/results/layout_move_check.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

TIMING_KEYS = ("samples_per_s", "seconds")  # wall-clock times: differ between any two runs
PATH_KEYS = ("data", "checkpoint", "out", "banks")  # where each tree wrote: differs by construction


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without(record: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(record, dict):
        return {k: without(v, keys) for k, v in record.items() if k not in keys}
    if isinstance(record, list):
        return [without(v, keys) for v in record]
    return record


def numbers_of(tree: Path) -> dict[str, Any]:
    data = next((tree / "benchmarks" / "work").glob("synth-*"))
    files = {str(p.relative_to(data)): sha256(p) for p in sorted(data.rglob("*"))
             if p.suffix in (".npy", ".csv") and p.is_file()}
    runs = {}
    for run in sorted((tree / "work" / "runs").iterdir()):
        metrics = [without(json.loads(line), TIMING_KEYS) for line in (run / "metrics.jsonl").read_text().splitlines()]
        runs[run.name] = {
            "metrics": metrics,
            "eval": {name: without(json.loads((run / name).read_text()), PATH_KEYS + TIMING_KEYS)
                     for name in ("eval.json", "eval_val.json") if (run / name).is_file()},
        }
    return {"files_sha256": files, "runs": runs}


def headline(scores: dict[str, Any]) -> dict[str, Any]:
    """Zero-shot top-1 per task and the retrieval recalls of one evaluation."""
    return {"zeroshot_top1": {task: s["top1"] for task, s in scores["zeroshot"].items()}, "retrieval": scores["retrieval"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label-before", default="before the move")
    parser.add_argument("--label-after", default="after the move")
    parser.add_argument("--note", default="", help="what the two trees are, for the record")
    args = parser.parse_args()
    before, after = numbers_of(args.before), numbers_of(args.after)
    differing_files = sorted(k for k in before["files_sha256"].keys() | after["files_sha256"].keys()
                             if before["files_sha256"].get(k) != after["files_sha256"].get(k))
    differing_runs = sorted(k for k in before["runs"].keys() | after["runs"].keys()
                            if before["runs"].get(k) != after["runs"].get(k))
    summary = {
        "identical": not differing_files and not differing_runs and bool(before["runs"]),
        "differing_files": differing_files,
        "differing_runs": differing_runs,
        "files_compared": len(before["files_sha256"]),
        "runs_compared": sorted(before["runs"]),
        "last_logged_step": {run: {"before": r["metrics"][-1], "after": after["runs"].get(run, {}).get("metrics", [None])[-1]}
                             for run, r in before["runs"].items()},
        "test_split": {run: {side: headline(runs[run]["eval"]["eval.json"]) if run in runs else None
                             for side, runs in (("before", before["runs"]), ("after", after["runs"]))}
                       for run in before["runs"]},
    }
    record = {"note": args.note, "summary": summary, args.label_before: before, args.label_after: after}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("identical", "differing_files", "differing_runs", "files_compared",
                                              "runs_compared")}))
    return 0 if summary["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
