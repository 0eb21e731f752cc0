"""Quality benchmark, part 4 of 5: the runs' metrics combined over seeds.

Mean and sample std per setting, paired deltas against a baseline, the recommendation
(picked on the validation split only) and the cost of every stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quality_plan import BASELINE, REFERENCE, STAGE_TIMINGS, _comparable, _read_json  # noqa: E402
from clip_ping.report import seed_stats  # noqa: E402  (mean and spread over seeds, as the report computes them)


def run_metrics(eval_test: dict[str, Any], eval_val: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Flat metrics per split: zs/<task>/top1, i2t/R@k, t2i/R@k, probe/<task>; and the val score."""
    out: dict[str, dict[str, float]] = {}
    for split, ev in (("test", eval_test), ("val", eval_val)):
        if not ev:
            continue
        m: dict[str, float] = {}
        for task, scores in (ev.get("zeroshot") or {}).items():
            m[f"zs/{task}/top1"] = float(scores["top1"])
        for short, key in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
            for k in ("R@1", "R@5"):
                value = (ev.get("retrieval") or {}).get(key, {}).get(k)
                if value is not None:
                    m[f"{short}/{k}"] = float(value)
        out[split] = m
    # Linear probe: test accuracy, and on val the accuracy at the C selected on val (fit on train).
    for task, probe in ((eval_test or {}).get("linear_probe") or {}).items():
        out.setdefault("test", {})[f"probe/{task}"] = float(probe["accuracy"])
        if "val" in out and probe.get("val_accuracy") is not None:
            out["val"][f"probe/{task}"] = float(probe["val_accuracy"])
    for split, m in out.items():
        parts = [v for k, v in m.items() if k.startswith("zs/")] + [m[k] for k in ("i2t/R@1", "t2i/R@1") if k in m]
        if parts:
            m["score"] = sum(parts) / len(parts)
    return out


def metric_label(key: str) -> str:
    if key == "score":
        return "score (mean of ZS top-1s, I2T R@1, T2I R@1)"
    kind, *rest = key.split("/")
    if kind == "zs":
        return f"zero-shot {rest[0]} top-1"
    if kind == "probe":
        return f"linear probe {rest[0]}"
    return f"{kind.upper()} {rest[0]}"


def _metrics_of(results: list[dict[str, Any]], split: str) -> list[str]:
    keys: list[str] = []
    for r in results:
        for k in r["metrics"].get(split, {}):
            if k not in keys:
                keys.append(k)
    order = lambda k: ({"zs": 0, "i2t": 1, "t2i": 2, "probe": 3}.get(k.split("/")[0], 4), k)  # noqa: E731
    return sorted(keys, key=order)


def aggregate(results: list[dict[str, Any]], settings: list[str], baseline: str = BASELINE) -> dict[str, Any]:
    """Per split, setting and metric: mean/std/n over seeds; paired delta against ``baseline``."""
    agg: dict[str, Any] = {}
    for split in ("test", "val"):
        keys = _metrics_of(results, split)
        per: dict[str, Any] = {}
        for setting in settings:
            runs = [r for r in results if r["setting"] == setting and split in r["metrics"]]
            if not runs:
                continue
            base = {r["seed"]: r for r in results if r["setting"] == baseline and split in r["metrics"]}
            entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "metrics": {}}
            for key in keys:
                vals = [r["metrics"][split][key] for r in runs if key in r["metrics"][split]]
                if not vals:
                    continue
                stats = seed_stats(vals)
                if setting != baseline:
                    diffs = [r["metrics"][split][key] - base[r["seed"]]["metrics"][split][key]
                             for r in runs if r["seed"] in base and key in r["metrics"][split]
                             and key in base[r["seed"]]["metrics"][split]]
                    if diffs:
                        d = seed_stats(diffs)
                        stats["delta_vs_clip"] = {"mean": d["mean"], "std": d["std"], "n": d["n"],
                                                  "paired_seeds": True}
                entry["metrics"][key] = stats
            per[setting] = entry
        agg[split] = {"metric_keys": keys, "settings": per}
    return agg


def _setting_value(group: str, spec: dict[str, Any], default_teacher: str) -> Any:
    from clip_ping.training.trainer import TrainConfig

    d = TrainConfig()
    if group == "lambdas":
        if spec.get("method") == "clip":
            return {"method": "clip", "lambda_nn": 0.0, "lambda_xnn": 0.0}
        return {"lambda_nn": spec.get("lambda_nn", d.lambda_nn), "lambda_xnn": spec.get("lambda_xnn", d.lambda_xnn)}
    if group == "image_teacher":
        return spec.get("teacher", default_teacher)
    return spec.get(group, getattr(d, group, None))


def recommend(agg: dict[str, Any], prof: dict[str, Any]) -> dict[str, Any]:
    """Defaults chosen on the VALIDATION split only, one factor at a time against the reference setting.

    Within each group the setting with the best mean val score wins; it replaces
    the reference (current default) only when its paired val gain over seeds is
    larger than one standard deviation of that gain, else the default is kept.
    """
    val = agg.get("val", {}).get("settings", {})
    out: dict[str, Any] = {
        "split": "val",
        "rule": ("score = mean of the zero-shot top-1 of every task, I2T R@1 and T2I R@1 on the VALIDATION split; "
                 "within each group the best mean score is recommended when its paired gain over the current default "
                 f"('{REFERENCE}') exceeds one standard deviation over seeds, otherwise the default is kept. "
                 "The test split plays no part in the choice."),
        "groups": {},
    }

    def score(setting: str) -> dict[str, Any] | None:
        return val.get(setting, {}).get("metrics", {}).get("score")

    def seed_scores(setting: str) -> dict[Any, float]:
        entry = val.get(setting)
        if not entry or "score" not in entry["metrics"]:
            return {}
        return dict(zip(entry["seeds"], entry["metrics"]["score"]["values"]))

    for group, members in prof["choices"].items():
        present = [m for m in members if score(m) is not None]
        if len(present) < 2:
            continue
        ranked = sorted(present, key=lambda m: score(m)["mean"], reverse=True)
        best = ranked[0]
        reference = REFERENCE if REFERENCE in present else ranked[-1]
        ref_s, best_s = seed_scores(reference), seed_scores(best)
        diffs = [best_s[s] - ref_s[s] for s in best_s if s in ref_s]
        gain = seed_stats(diffs) if diffs else None
        clear = bool(best != reference and gain and gain["std"] is not None and gain["mean"] > gain["std"])
        chosen = best if (best == reference or clear) else reference
        out["groups"][group] = {
            "ranking": [{"setting": m, "val_score_mean": score(m)["mean"], "val_score_std": score(m)["std"]}
                        for m in ranked],
            "best_on_val": best,
            "reference": reference,
            "gain_over_reference": None if best == reference or gain is None else
            {"mean": gain["mean"], "std": gain["std"], "n": gain["n"]},
            "clear": clear if best != reference else None,
            "recommended_setting": chosen,
            "recommended_value": _setting_value(group, prof["setting_specs"][chosen], prof["image_teacher"]),
        }
    return out


def cost_summary(results: list[dict[str, Any]], records: dict[str, Any], settings: list[str],
                 default_teacher: str) -> dict[str, Any]:
    per_setting = {}
    for setting in settings:
        runs = [r for r in results if r["setting"] == setting and r["timing"].get("train_steps_timed")]
        if not runs:
            continue
        s_per_step = [r["timing"]["train_seconds"] / r["timing"]["train_steps_timed"] for r in runs]
        cpu_per_step = [r["timing"]["train_cpu_seconds"] / r["timing"]["train_steps_timed"] for r in runs
                        if "train_cpu_seconds" in r["timing"]]
        sps = [r["samples_per_s"] for r in runs if r.get("samples_per_s")]
        per_setting[setting] = {
            "runs_timed": len(runs),
            "train_seconds_mean": sum(r["timing"]["train_seconds"] for r in runs) / len(runs),
            "s_per_step": seed_stats(s_per_step),
            "cpu_s_per_step": seed_stats(cpu_per_step) if cpu_per_step else None,
            "samples_per_s_logged": seed_stats(sps) if sps else None,
            "train_peak_rss_mb": max(r["timing"].get("train_peak_rss_mb", 0.0) for r in runs),
            "train_peak_rss_children_mb": max(r["timing"].get("train_peak_rss_children_mb", 0.0) for r in runs),
            "eval_seconds_mean": sum(r["timing"].get("eval_val_seconds", 0) + r["timing"].get("eval_test_seconds", 0)
                                     for r in runs) / len(runs),
            "eval_peak_rss_mb": max(r["timing"].get("eval_peak_rss_mb", 0.0) for r in runs),
        }
    out: dict[str, Any] = {"stages": records, "training": per_setting}
    if BASELINE in per_setting and REFERENCE in per_setting:
        a, b = per_setting[BASELINE], per_setting[REFERENCE]
        out["step_time_ratio_clip_ping_over_clip"] = b["s_per_step"]["mean"] / a["s_per_step"]["mean"]
        if a["samples_per_s_logged"] and b["samples_per_s_logged"]:
            out["steady_step_time_ratio_clip_ping_over_clip"] = (a["samples_per_s_logged"]["mean"]
                                                                 / b["samples_per_s_logged"]["mean"])
        if a["cpu_s_per_step"] and b["cpu_s_per_step"]:
            out["cpu_time_ratio_clip_ping_over_clip"] = b["cpu_s_per_step"]["mean"] / a["cpu_s_per_step"]["mean"]
        offline = sum(v["seconds"] for k, v in records.items()
                      if k in (f"extract:{default_teacher}", f"neighbors:{default_teacher}"))
        out["offline_seconds_default_teachers"] = offline or None
        out["offline_over_one_clip_ping_run"] = (offline / b["train_seconds_mean"]) if offline else None
    return out


def collect(plan: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for run in plan["runs"]:
        run_dir = Path(run["run_dir"])
        ev_test, ev_val = _read_json(run_dir / "eval.json"), _read_json(run_dir / "eval_val.json")
        if ev_test is None:
            continue
        timing = _read_json(run_dir / STAGE_TIMINGS) or {}
        sps = []
        if (run_dir / "metrics.jsonl").is_file():
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            sps = [r["samples_per_s"] for r in records[1:] if isinstance(r.get("samples_per_s"), (int, float))]
        results.append({"setting": run["setting"], "seed": run["seed"], "run_dir": str(run_dir),
                        "teacher": run["teacher"], "config": _comparable(run["train"]),
                        "metrics": run_metrics(ev_test, ev_val), "timing": timing,
                        "samples_per_s": (sum(sps) / len(sps)) if sps else None,
                        "eval_test": {k: ev_test.get(k) for k in ("zeroshot", "retrieval", "linear_probe", "n_images")},
                        "eval_val": {k: (ev_val or {}).get(k) for k in ("zeroshot", "retrieval", "n_images")}})
    return results
