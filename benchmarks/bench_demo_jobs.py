"""`clip-ping demo` with its runs one after another (``--jobs 1``) against its default, alternated;
or, with ``--against REV``, this tree's demo against the demo of git revision REV.

Each demo runs in a fresh process into a fresh folder, B A A B ... (the first round
starts with the default), so a machine whose speed drifts slows both sides alike.
Prints each run's wall time and stage times (timings.json) and the ratio per round.
REV runs from a git worktree under ``benchmarks/work/revisions/`` with the same
Python environment (so only the package's code differs).

    .venv/bin/python benchmarks/bench_demo_jobs.py --rounds 2
    .venv/bin/python benchmarks/bench_demo_jobs.py --rounds 2 --against main --out demo_vs_main
    .venv/bin/python benchmarks/bench_demo_jobs.py --rounds 1 --extra "--n-train 600 --epochs 1 --seeds 0"  # smoke

Results: ``benchmarks/results/<--out>.json``; the demos' folders stay under
``benchmarks/work/demo-jobs/`` (their reports included).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from _common import ROOT, WORK, load_average, machine_facts, print_table, revision_tree, write_json

SIDES = {"default": (ROOT, []), "jobs1": (ROOT, ["--jobs", "1"])}


def add_revision_side(rev: str) -> str:
    """A side that runs the demo of git revision ``rev`` (checked out once into a worktree)."""
    SIDES[rev] = (revision_tree(rev), [])
    return rev


def run_demo(side: str, round_no: int, extra: list[str]) -> dict:
    out = WORK / "demo-jobs" / f"{side.replace('/', '_')}-{round_no}"
    shutil.rmtree(out, ignore_errors=True)
    tree, options = SIDES[side]
    cmd = [sys.executable, "-m", "clip_ping.cli", "demo", "--out", str(out), "--no-progress", *options, *extra]
    load = load_average()
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    stages = json.loads((out / "timings.json").read_text())
    print(f"{side} round {round_no}: {wall:.1f} s (load average at start {load})", flush=True)
    return {"side": side, "round": round_no, "wall_s": wall, "load_avg_start": load, "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--extra", default="", help="more demo options for both sides, one string")
    ap.add_argument("--against", default=None, metavar="REV",
                    help="compare this tree's demo with git revision REV's (instead of --jobs 1)")
    ap.add_argument("--out", default="demo_jobs")
    args = ap.parse_args()
    facts = machine_facts()
    extra = shlex.split(args.extra)
    other = add_revision_side(args.against) if args.against else "jobs1"
    runs = []
    for r in range(1, args.rounds + 1):
        order = ["default", other] if r % 2 else [other, "default"]
        runs += [run_demo(side, r, extra) for side in order]
    rows = []
    for r in range(1, args.rounds + 1):
        wall = {x["side"]: x["wall_s"] for x in runs if x["round"] == r}
        rows.append([r, wall[other], wall["default"], wall[other] / wall["default"]])
    medians = {side: statistics.median(x["wall_s"] for x in runs if x["side"] == side) for side in ("default", other)}
    rows.append(["median", medians[other], medians["default"], medians[other] / medians["default"]])
    other_label = f"{args.against} s" if args.against else "--jobs 1 s"
    print_table(rows, ["round", other_label, "this tree s" if args.against else "default s", "speed-up"],
                title="demo wall time, fresh process each")
    path = write_json(args.out, {"machine": facts, "extra": extra, "against": args.against, "runs": runs,
                                 "median_wall_s": medians})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
