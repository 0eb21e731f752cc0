"""Paired deltas between any two settings of a benchmarks/quality.py result file, seed by seed.

    python benchmarks/quality_pairs.py benchmarks/results/quality_duplicates_openclipart_duplicates.json \\
        clip-ping:clip clip-ping-dup-mask:clip-dup-mask clip-ping-dup-positives:clip-dup-positives \\
        clip-dup-mask:clip clip-ping-dup-mask:clip-ping

quality.py reports every setting against plain CLIP (and against the CLIP-PING
defaults). A rule that changes both methods, such as the duplicate-caption
rule of the CLIP term, needs the pairs within that rule: CLIP-PING with the rule
against CLIP with the rule. Each pair ``A:B`` gives mean ± sample std over the
seeds both settings ran of A - B, per metric and split, as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_ping.report import seed_stats  # noqa: E402

METRICS = ("i2t/R@1", "t2i/R@1", "i2t/R@5", "t2i/R@5", "score")


def paired(results: list[dict], a: str, b: str, split: str, metric: str) -> dict | None:
    """Seed-paired A - B of one metric, or None when the settings share no seed with it."""
    by = {(r["setting"], r["seed"]): r["metrics"].get(split, {}).get(metric) for r in results}
    seeds = sorted(s for (name, s) in by if name == a and by.get((b, s)) is not None and by[(a, s)] is not None)
    if not seeds:
        return None
    return seed_stats([by[(a, s)] - by[(b, s)] for s in seeds])


def fmt(st: dict | None) -> str:
    if st is None:
        return "–"
    return f"{st['mean']:+.2f}" + (f" ± {st['std']:.2f}" if st["std"] is not None else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a quality_<profile>_<data>[_<tag>].json file")
    parser.add_argument("pairs", nargs="+", help="A:B pairs of setting names (A - B)")
    parser.add_argument("--splits", nargs="+", default=["test", "val"])
    args = parser.parse_args(argv)
    doc = json.loads(args.results.read_text())
    settings = {r["setting"] for r in doc["results"]}
    header = "| A - B | split | seeds | " + " | ".join(METRICS) + " |"
    print(header)
    print("|" + "---|" * (3 + len(METRICS)))
    for pair in args.pairs:
        a, sep, b = pair.partition(":")
        if not sep or a not in settings or b not in settings:
            print(f"error: {pair!r} is not A:B with both in {sorted(settings)}", file=sys.stderr)
            return 2
        for split in args.splits:
            cells = [paired(doc["results"], a, b, split, m) for m in METRICS]
            n = max((c["n"] for c in cells if c), default=0)
            print(f"| {a} - {b} | {split} | {n} | " + " | ".join(fmt(c) for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
