"""How long a user waits for `clip-ping ... --help`: this tree against git revision REV, alternated.

Each call is a fresh process (`python -m clip_ping.cli ARGS`), timed from outside from its
start to its exit; the two versions run in turn (A B B A ...), so a drifting machine slows
both alike. REV runs from a git worktree under ``benchmarks/work/revisions/`` with the same
Python environment.

    .venv/bin/python benchmarks/bench_cli_start.py --against HEAD~1 --rounds 5

Results: ``benchmarks/results/<--out>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from _common import ROOT, machine_facts, print_table, revision_tree, write_json

COMMANDS = (["--help"], ["data", "--help"], ["train", "--help"])


def time_call(tree, args: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clip_ping.cli", *args], cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "usage: clip-ping" not in done.stdout:
        sys.exit(f"clip-ping {' '.join(args)} in {tree} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, metavar="REV", help="the git revision to compare with")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="cli_start")
    args = ap.parse_args()
    facts = machine_facts()
    sides = {"this tree": ROOT, args.against: revision_tree(args.against)}
    times: dict[str, dict[str, list[float]]] = {" ".join(c): {s: [] for s in sides} for c in COMMANDS}
    for command in COMMANDS:
        key = " ".join(command)
        for tree in sides.values():  # warm-up: the file cache
            time_call(tree, command)
        for r in range(args.rounds):
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                times[key][side].append(time_call(sides[side], command))
    rows, medians = [], {}
    for key, per_side in times.items():
        medians[key] = {side: statistics.median(v) for side, v in per_side.items()}
        ours, theirs = medians[key]["this tree"], medians[key][args.against]
        rows.append([f"clip-ping {key}", theirs, ours, theirs / ours, f"{min(per_side['this tree']):.2f}-"
                     f"{max(per_side['this tree']):.2f}"])
    print_table(rows, ["command", f"{args.against} s", "this tree s", "speed-up", "this tree min-max"],
                title=f"wall time of a fresh process, median of {args.rounds}")
    path = write_json(args.out, {"machine": facts, "against": args.against, "rounds": args.rounds, "seconds": times,
                                 "median_s": medians})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
