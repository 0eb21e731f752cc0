"""`clip-ping demo` with its runs one after another (``--jobs 1``) against its default, alternated.

Each demo runs in a fresh process into a fresh folder, B A A B ... (the first round
starts with the default), so a machine whose speed drifts slows both sides alike.
Prints each run's wall time and stage times (timings.json) and the ratio per round.

    .venv/bin/python benchmarks/bench_demo_jobs.py --rounds 2
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

from _common import ROOT, WORK, load_average, machine_facts, print_table, write_json

SIDES = {"default": [], "jobs1": ["--jobs", "1"]}


def run_demo(side: str, round_no: int, extra: list[str]) -> dict:
    out = WORK / "demo-jobs" / f"{side}-{round_no}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "clip_ping.cli", "demo", "--out", str(out), "--no-progress", *SIDES[side], *extra]
    load = load_average()
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
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
    ap.add_argument("--out", default="demo_jobs")
    args = ap.parse_args()
    facts = machine_facts()
    extra = shlex.split(args.extra)
    runs = []
    for r in range(1, args.rounds + 1):
        order = ["default", "jobs1"] if r % 2 else ["jobs1", "default"]
        runs += [run_demo(side, r, extra) for side in order]
    rows = []
    for r in range(1, args.rounds + 1):
        wall = {x["side"]: x["wall_s"] for x in runs if x["round"] == r}
        rows.append([r, wall["jobs1"], wall["default"], wall["jobs1"] / wall["default"]])
    medians = {side: statistics.median(x["wall_s"] for x in runs if x["side"] == side) for side in SIDES}
    rows.append(["median", medians["jobs1"], medians["default"], medians["jobs1"] / medians["default"]])
    print_table(rows, ["round", "--jobs 1 s", "default s", "speed-up"], title="demo wall time, fresh process each")
    path = write_json(args.out, {"machine": facts, "extra": extra, "runs": runs, "median_wall_s": medians})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
