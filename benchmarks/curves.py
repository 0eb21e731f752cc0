"""CLIP-PING against CLIP as curves: data, teacher strength, training length (from quality.py's runs).

    .venv/bin/python benchmarks/quality.py --profile curves-data      # first the runs (one curve a profile, or
    .venv/bin/python benchmarks/quality.py --profile curves-teacher   #  --profile curves for all of them)
    .venv/bin/python benchmarks/curves.py                             # then the tables and the plots

Reads the run folders of the quality benchmark's curve profiles (one ``--out``, the
same as quality.py's), pairs every CLIP-PING point with CLIP at the same seed, data
and steps, and measures each image teacher's own quality: the share of train rows
whose top-1 image neighbour has the same label (category column; subcategory
beside it), `clip_ping.knn.show.label_agreement` over the bank's neighbour table.
Writes ``benchmarks/results/curves_<data>.{json,md}`` and one PNG per curve
(``curves_<curve>_<data>.png``). A point whose runs are missing is left out and
named in the output; decisions are read on the val split, test is shown beside.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (the benchmark whose runs are read: its plan, run folders and metrics)

from clip_ping.report import seed_stats  # noqa: E402

# x value, CLIP setting, CLIP-PING setting (same seed, data and steps within a point)
DATA_CURVE = [(0.25, "clip-train25", "clip-ping-train25"), (0.5, "clip-train50", "clip-ping-train50"),
              (1.0, "clip", "clip-ping")]
DATA_FIXED_STEPS = [(0.25, "clip-train25-400steps", "clip-ping-train25-400steps"),
                    (0.5, "clip-train50-400steps", "clip-ping-train50-400steps"), (1.0, "clip", "clip-ping")]
LENGTH_CURVE = [(400, "clip", "clip-ping"), (1200, "clip-1200steps", "clip-ping-1200steps")]
# image teacher, CLIP-PING setting; every one is paired with plain CLIP (which reads no teacher)
TEACHERS = [("random-efficientnet-lite0", "teacher-random"), ("efficientnet-lite0", "clip-ping"),
            ("efficientnet-lite1", "teacher-lite1"), ("efficientnet-lite2", "teacher-lite2")]
# the subcategory analysis's one fix (benchmarks/results/subcategory_analysis_openclipart.md): its profile, its setting
SUBCATEGORY_FIX = ("subcategory-fix", "lambda-0.25")
CURVES = {"data": DATA_CURVE, "data-fixed-steps": DATA_FIXED_STEPS, "length": LENGTH_CURVE}
METRICS = ["score", "i2t/R@1", "t2i/R@1", "zs/category/top1", "zs/subcategory/top1"]
SPLITS = ("val", "test")


def _by_seed(results: list[dict[str, Any]], setting: str, split: str, key: str) -> dict[int, float]:
    return {r["seed"]: r["metrics"][split][key] for r in results
            if r["setting"] == setting and key in r["metrics"].get(split, {})}


def paired_point(results: list[dict[str, Any]], base: str, other: str) -> dict[str, Any] | None:
    """Both methods' mean ± std over seeds, and the paired difference other - base, per split and metric."""
    out: dict[str, Any] = {}
    for split in SPLITS:
        for key in METRICS:
            a, b = _by_seed(results, base, split, key), _by_seed(results, other, split, key)
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            out.setdefault(split, {})[key] = {
                "seeds": seeds, "base": seed_stats([a[s] for s in seeds]), "other": seed_stats([b[s] for s in seeds]),
                "delta": seed_stats([b[s] - a[s] for s in seeds])}
    return out or None


def teacher_quality(bank: Path, data: Path) -> dict[str, Any] | None:
    """Label agreement of a bank's top-1 neighbours (image and text side) on the train rows' label columns."""
    import numpy as np

    from clip_ping.data.table import open_table
    from clip_ping.knn.show import label_agreement
    from clip_ping.knn.table import load_neighbors

    if not (bank / "neighbors.json").is_file():
        return None
    table = open_table(data, "train")
    neighbors = load_neighbors(bank)
    valid = np.load(bank / "valid.npy") if (bank / "valid.npy").is_file() else np.ones(len(table), dtype=bool)
    return label_agreement(table.labels, neighbors.image, neighbors.text, rows=np.flatnonzero(valid))


def subcategory_purity(bank: Path, data: Path, coarse: str = "category",
                       fine: str = "subcategory") -> dict[str, Any] | None:
    """Where a top-1 neighbour lands against the sample's labels: same subcategory, same category but another
    subcategory (a pull that can blur subcategories), or another category. Rows without a subcategory are
    not counted; None when the data has no such columns."""
    import numpy as np

    from clip_ping.data.table import open_table
    from clip_ping.knn.table import load_neighbors

    if not (bank / "neighbors.json").is_file():
        return None
    table = open_table(data, "train")
    labels = table.labels
    if coarse not in labels or fine not in labels:
        return None
    cat, sub = (np.asarray(labels[c], dtype=object).astype(str) for c in (coarse, fine))
    neighbors = load_neighbors(bank)
    rows = np.flatnonzero(np.char.str_len(sub.astype(str)) > 0)
    out = {}
    for side, nn in (("image", neighbors.image), ("text", neighbors.text)):
        j = np.asarray(nn[rows, 0])
        same_sub = (sub[j] == sub[rows]) & (cat[j] == cat[rows])
        same_cat = cat[j] == cat[rows]
        out[side] = {"same_subcategory": float(same_sub.mean()), "same_category_other_subcategory":
                     float((same_cat & ~same_sub).mean()), "other_category": float((~same_cat).mean())}
    out["rows"] = int(len(rows))
    out["subcategories"] = int(len(set(sub[rows])))
    out["categories"] = int(len(set(cat[rows])))
    return out


def subcategory_by_seed(results: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Zero-shot subcategory top-1 of each CLIP / CLIP-PING pair at each seed, and how the paired loss
    follows CLIP's own number (a baseline seed that happens to do well makes every guided setting "lose")."""
    import numpy as np

    out: dict[str, Any] = {}
    key = "zs/subcategory/top1"
    for split in SPLITS:
        rows = []
        for base, other in pairs:
            a, b = _by_seed(results, base, split, key), _by_seed(results, other, split, key)
            rows += [{"clip": base, "clip_ping": other, "seed": s, "clip_value": a[s], "clip_ping_value": b[s],
                      "delta": b[s] - a[s]} for s in sorted(set(a) & set(b))]
        if len(rows) >= 3:
            clip = np.array([r["clip_value"] for r in rows])
            ping = np.array([r["clip_ping_value"] for r in rows])
            out[split] = {"pairs": rows, "corr_delta_vs_clip_value": float(np.corrcoef(clip, ping - clip)[0, 1]),
                          "clip_std": float(clip.std(ddof=1)), "clip_ping_std": float(ping.std(ddof=1))}
    return out


PATHS = ("data", "banks")  # where a run read its data and bank: differs between machines, not what it computed


def with_reference_runs(results: list[dict[str, Any]], plan: dict[str, Any],
                        reference: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """``results`` plus the runs of earlier quality.py results files that fill a (setting, seed) of the plan
    missing here, when trained with the plan's options for it (paths aside); returns them and the notes."""
    planned = {(r["setting"], r["seed"]): quality._comparable(r["train"]) for r in plan["runs"]}
    have = {(r["setting"], r["seed"]) for r in results}
    notes = []
    for path in reference:
        doc = json.loads(path.read_text())
        for r in doc["results"]:
            key = (r["setting"], r["seed"])
            if key not in planned or key in have:
                continue
            want = {k: v for k, v in planned[key].items() if k not in PATHS}
            got = {k: v for k, v in r["config"].items() if k not in PATHS}
            if want != got:
                notes.append(f"{path.name}: {key[0]} seed {key[1]} not used (trained with other options)")
                continue
            results.append({**r, "source": f"{path.name} ({doc.get('date')})"})
            have.add(key)
            notes.append(f"{key[0]} seed {key[1]}: from {path.name} ({doc.get('date')})")
    return results, notes


def build(out: Path, data: str = "openclipart", reference: list[Path] | None = None) -> dict[str, Any]:
    prof = quality.resolve_profile("curves", data)
    plan = quality.make_plan(prof, out)
    results, reused = with_reference_runs(quality.collect(plan), plan, reference or [])
    doc: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "out": str(out), "data_dir": plan["data_dir"], "runs_found": len(results),
                           "reused_runs": reused, "train": prof["train"], "curves": {}, "missing": []}
    for name, points in CURVES.items():
        rows = []
        for x, base, other in points:
            point = paired_point(results, base, other)
            if point is None:
                doc["missing"].append(f"{name}: {other} vs {base}")
                continue
            rows.append({"x": x, "clip": base, "clip_ping": other, **point})
        doc["curves"][name] = rows
    # does CLIP-PING on half the data reach CLIP on all of it? (paired by seed)
    doc["clip_ping_50pct_vs_clip_100pct"] = paired_point(results, "clip", "clip-ping-train50")
    doc["clip_ping_25pct_vs_clip_50pct"] = paired_point(results, "clip-train50", "clip-ping-train25")
    doc["clip_ping_25pct_vs_clip_100pct"] = paired_point(results, "clip", "clip-ping-train25")

    pairs = [(b, o) for points in CURVES.values() for _, b, o in points] + [("clip", t) for _, t in TEACHERS]
    doc["subcategory_by_seed"] = subcategory_by_seed(results, list(dict.fromkeys(pairs)))
    data_dir = Path(plan["data_dir"])
    teachers = []
    for teacher, setting in TEACHERS:
        bank = quality.bank_dir_for(data_dir, teacher, prof["image_teacher"])
        agreement = teacher_quality(bank, data_dir)
        point = paired_point(results, "clip", setting)
        if agreement is None or point is None:
            doc["missing"].append(f"teacher {teacher} ({'no bank' if agreement is None else 'no runs'})")
        teachers.append({"teacher": teacher, "setting": setting, "label_agreement": agreement, **(point or {})})
    doc["curves"]["teacher"] = teachers
    # each teacher's neighbour quality on every data folder it has a bank for (the subsets: fewer rows, farther
    # neighbours), so teachers can be ranked on the 25 % rows too where their full banks are missing
    doc["bank_quality"] = {}
    for folder in [data_dir, *(Path(p) for p in plan["subsets"])]:
        for teacher, _ in TEACHERS:
            bank = quality.bank_dir_for(folder, teacher, prof["image_teacher"])
            agreement = teacher_quality(bank, folder)
            if agreement:
                doc["bank_quality"][f"{teacher} on {folder.name}"] = agreement
    doc["subcategory_fix"] = subcategory_fix(out, data, reference or [])
    doc["subcategory_purity"] = subcategory_purity(quality.bank_dir_for(data_dir, prof["image_teacher"],
                                                                        prof["image_teacher"]), data_dir)
    return doc


def subcategory_fix(out: Path, data: str, reference: list[Path]) -> dict[str, Any]:
    """The fix's runs paired by seed with CLIP and with CLIP-PING's defaults (same data, steps, seed)."""
    profile, setting = SUBCATEGORY_FIX
    plan = quality.make_plan(quality.resolve_profile(profile, data), out)
    results, _ = with_reference_runs(quality.collect(plan), plan, reference)
    return {"profile": profile, "setting": setting, "vs_clip": paired_point(results, "clip", setting),
            "vs_clip_ping": paired_point(results, "clip-ping", setting)}


# --------------------------------------------------------------------------- plots and markdown


def _label(key: str) -> str:
    return "score" if key == "score" else quality.metric_label(key)


def plot(doc: dict[str, Any], results_dir: Path, data: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    keys = ["score", "i2t/R@1", "t2i/R@1", "zs/category/top1"]
    for name, rows in doc["curves"].items():
        rows = [r for r in rows if "val" in r and (name != "teacher" or r["label_agreement"])]
        if len(rows) < 2:  # a curve needs two points
            continue
        fig, axes = plt.subplots(len(SPLITS), len(keys), figsize=(4 * len(keys), 3.4 * len(SPLITS)), squeeze=False)
        for i, split in enumerate(SPLITS):
            for j, key in enumerate(keys):
                ax = axes[i][j]
                pts = [r for r in rows if key in r.get(split, {})]
                if name == "teacher":
                    pts = [r for r in pts if r["label_agreement"]]
                    xs = [100 * r["label_agreement"]["category"]["image_side_top1"] for r in pts]
                    d = [r[split][key]["delta"] for r in pts]
                    ax.errorbar(xs, [s["mean"] for s in d], yerr=[s["std"] or 0 for s in d], fmt="o", capsize=4,
                                color="C1", label="CLIP-PING − CLIP (paired)")
                    for x, r, s in zip(xs, pts, d):
                        ax.annotate(r["teacher"].replace("efficientnet-", ""), (x, s["mean"]), fontsize=7,
                                    xytext=(4, 4), textcoords="offset points")
                    ax.axhline(0, color="C0", lw=1, label="CLIP")
                    ax.set_xlabel("teacher: top-1 image neighbour, same category (%)")
                    ax.set_ylabel(f"Δ {_label(key)}")
                else:
                    xs = [r["x"] * (100 if name.startswith("data") else 1) for r in pts]
                    for method, colour, title in (("base", "C0", "CLIP"), ("other", "C1", "CLIP-PING")):
                        st = [r[split][key][method] for r in pts]
                        ax.errorbar(xs, [s["mean"] for s in st], yerr=[s["std"] or 0 for s in st], marker="o",
                                    capsize=4, color=colour, label=title)
                    ax.set_xlabel("train rows (%)" + (", 400 steps" if name == "data-fixed-steps" else
                                                      ", 8 epochs" if name == "data" else "")
                                  if name.startswith("data") else "training steps")
                    ax.set_xticks(xs)
                    ax.set_ylabel(_label(key))
                ax.set_title(f"{split}: {_label(key)}", fontsize=9)
                ax.grid(alpha=0.3)
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
        fig.suptitle(f"CLIP vs CLIP-PING, {name} curve ({data}, ViT-XXS-8-64, mean ± std over seeds)", fontsize=10)
        fig.tight_layout()
        path = results_dir / f"curves_{name}_{data}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _cell(s: dict[str, Any] | None, sign: bool = False) -> str:
    if not s:
        return "–"
    text = f"{'+' if sign and s['mean'] >= 0 else ''}{s['mean']:.2f}"
    return text + (f" ± {s['std']:.2f}" if s.get("std") is not None else "")


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# CLIP vs CLIP-PING as curves ({doc['date']})", "",
             f"- runs found: {doc['runs_found']} in `{doc['out']}`; student {doc['train']['model']}, batch "
             f"{doc['train']['batch_size']}, lr {doc['train']['lr']}",
             "- cells: mean ± sample std over seeds (%); Δ: CLIP-PING − CLIP at the same seed, data and steps",
             *[f"- reused: {note}" for note in doc.get("reused_runs", [])],
             ""]
    keys = ["score", "i2t/R@1", "t2i/R@1", "zs/category/top1", "zs/subcategory/top1"]
    for name, rows in doc["curves"].items():
        rows = [r for r in rows if "val" in r]
        if not rows:
            continue
        lines += [f"## {name}", ""]
        for split in SPLITS:
            head = {"teacher": "teacher (same-category top-1 image neighbour)", "length": "steps"}.get(
                name, "share of the train rows")
            lines += [f"{split}:", "", f"| {head} | n | " + " | ".join(
                f"CLIP {_label(k)} | CLIP-PING | Δ" for k in keys) + " |", "|---|---|" + "---|---|---|" * len(keys)]
            for r in rows:
                if split not in r:
                    continue
                x = (f"{r['teacher']} ({100 * r['label_agreement']['category']['image_side_top1']:.1f} %)"
                     if name == "teacher" and r["label_agreement"] else str(r.get("x", r.get("teacher"))))
                n = len(next(iter(r[split].values()))["seeds"])
                lines.append(f"| {x} | {n} | " + " | ".join(
                    f"{_cell(r[split][k]['base'])} | {_cell(r[split][k]['other'])} | {_cell(r[split][k]['delta'], True)}"
                    if k in r[split] else "– | – | –" for k in keys) + " |")
            lines.append("")
    for title, key in (("CLIP-PING on 50 % vs CLIP on 100 %", "clip_ping_50pct_vs_clip_100pct"),
                       ("CLIP-PING on 25 % vs CLIP on 50 %", "clip_ping_25pct_vs_clip_50pct"),
                       ("CLIP-PING on 25 % vs CLIP on 100 %", "clip_ping_25pct_vs_clip_100pct")):
        point = doc.get(key)
        if point:
            lines += [f"## {title} (paired by seed)", "", "| split | " + " | ".join(_label(k) for k in keys) + " |",
                      "|---|" + "---|" * len(keys)]
            for split in SPLITS:
                if split in point:
                    lines.append(f"| {split} | " + " | ".join(_cell(point[split].get(k, {}).get("delta"), True)
                                                             for k in keys) + " |")
            lines.append("")
    fix = doc.get("subcategory_fix") or {}
    if fix.get("vs_clip") or fix.get("vs_clip_ping"):
        lines += [f"## The subcategory fix: `{fix['setting']}` (profile {fix['profile']}), paired by seed", "",
                  "| against | split | n | " + " | ".join(f"{_label(k)} Δ" for k in keys) + " |",
                  "|---|---|---|" + "---|" * len(keys)]
        for against, key in (("CLIP", "vs_clip"), ("CLIP-PING defaults", "vs_clip_ping")):
            for split in SPLITS:
                point = (fix.get(key) or {}).get(split)
                if point:
                    n = len(next(iter(point.values()))["seeds"])
                    lines.append(f"| {against} | {split} | {n} | " + " | ".join(
                        _cell(point.get(k, {}).get("delta"), True) for k in keys) + " |")
        lines.append("")
    if doc.get("bank_quality"):
        lines += ["## Neighbour quality of each bank (its train rows; top-1 neighbour has the same label, %)", "",
                  "| image teacher, data | category, image side | category, text side | subcategory, image side | "
                  "subcategory, text side | chance (category) |", "|---|---|---|---|---|---|"]
        for name, agreement in doc["bank_quality"].items():
            if agreement and "category" in agreement:
                c, s = agreement["category"], agreement.get("subcategory", {})
                lines.append(f"| {name} | {100 * c['image_side_top1']:.1f} | {100 * c['text_side_top1']:.1f} | "
                             f"{100 * s.get('image_side_top1', float('nan')):.1f} | "
                             f"{100 * s.get('text_side_top1', float('nan')):.1f} | {100 * c['chance']:.1f} |")
        lines.append("")
    purity = doc.get("subcategory_purity")
    if purity:
        lines += [f"## Where the default bank's top-1 neighbours land ({purity['rows']} train rows with a subcategory, "
                  f"{purity['subcategories']} subcategories in {purity['categories']} categories)", "",
                  "| side | same subcategory | same category, other subcategory | other category |", "|---|---|---|---|"]
        for side in ("image", "text"):
            p = purity[side]
            lines.append(f"| {side} | {100 * p['same_subcategory']:.1f} | "
                         f"{100 * p['same_category_other_subcategory']:.1f} | {100 * p['other_category']:.1f} |")
        lines.append("")
    for split, block in (doc.get("subcategory_by_seed") or {}).items():
        lines += [f"Zero-shot subcategory top-1 by seed ({split}): correlation of the paired Δ with CLIP's own value "
                  f"{block['corr_delta_vs_clip_value']:+.2f} over {len(block['pairs'])} pairs; std over the pairs: CLIP "
                  f"{block['clip_std']:.2f}, CLIP-PING {block['clip_ping_std']:.2f}", ""]
    if doc.get("missing"):
        lines += ["Not measured (runs or banks missing): " + "; ".join(doc["missing"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="openclipart", choices=("openclipart", "synth"))
    parser.add_argument("--out", default=None, help="quality.py's work folder (default: benchmarks/work/quality_<data>)")
    parser.add_argument("--results", default=str(quality.RESULTS))
    parser.add_argument("--reference", nargs="*", type=Path, default=[],
                        help="quality.py results files whose runs fill points not trained in --out, when trained with "
                             "the same options (e.g. an earlier quick run of the same code); a run in --out wins")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else quality.WORK / f"quality_{args.data}"
    doc = build(out.resolve(), args.data, args.reference)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"curves_{args.data}.json").write_text(json.dumps(doc, indent=2, default=str))
    text = markdown(doc)
    (results / f"curves_{args.data}.md").write_text(text, encoding="utf-8")
    for path in plot(doc, results, args.data):
        print(f"[curves] plot: {path}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
