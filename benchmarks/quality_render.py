"""Quality benchmark, part 5 of 5: the result document as markdown."""

from __future__ import annotations

import json
from typing import Any

from quality_plan import BASELINE, SECOND_BASELINE  # noqa: E402
from quality_aggregate import metric_label  # noqa: E402


def _cell(stats: dict[str, Any] | None, delta: bool = False) -> str:
    if not stats:
        return "–"
    sign = "+" if delta and stats["mean"] >= 0 else ""
    text = f"{sign}{stats['mean']:.2f}"
    return text + (f" ± {stats['std']:.2f}" if stats.get("std") is not None else "")


def markdown(doc: dict[str, Any]) -> str:
    prof = doc["profile"]
    lines = [f"# Quality benchmark: profile `{prof['name']}`, data `{prof['data_name']}`", "",
             f"- date: {doc['date']}",
             "- command(s): " + "; ".join(f"`{c}`" for c in doc["commands"]),
             f"- machine: {doc['machine']['cpus']} CPUs ({doc['machine']['processor']}), torch "
             f"{doc['machine']['torch']}, load average at start {doc['machine']['load_average_start']}",
             f"- student {prof['train']['model']}, {prof['train'].get('steps')} steps x batch "
             f"{prof['train']['batch_size']} ({doc['epochs_equivalent']:.1f} epochs of {doc['n_train']} train pairs), "
             f"lr {prof['train']['lr']}, precision {prof['train']['precision']}, seeds {prof['seeds']}; "
             f"teachers {prof['image_teacher']} + {prof['text_teacher']}, k={prof['neighbor_k']} neighbours stored",
             "- cells: mean ± sample std over seeds (%); Δ: paired difference to plain CLIP at the same seed, "
             "mean ± std over seeds"]
    for name, spec in (doc.get("neighbor_variants") or {}).items():
        recall = spec.get("top1_recall_vs_exact") or {}
        lines.append(f"- neighbour table `{name}`: search {spec['options']} over the {spec['teacher']} bank; recall@1 "
                     f"against the exact table (ties count as found): image {recall.get('image')}, "
                     f"text {recall.get('text')}")
    lines.append("")
    for split, title in (("test", "Test split"), ("val", "Validation split")):
        block = doc["aggregate"].get(split)
        if not block or not block["settings"]:
            continue
        keys = block["metric_keys"]
        lines += [f"## {title}", "", "| setting | n | " + " | ".join(metric_label(k) for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for setting, entry in block["settings"].items():
            lines.append(f"| {setting} | {len(entry['seeds'])} | "
                         + " | ".join(_cell(entry["metrics"].get(k)) for k in keys) + " |")
        lines += ["", f"Δ vs plain CLIP ({split}):", "", "| setting | " + " | ".join(metric_label(k) for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for setting, entry in block["settings"].items():
            if setting == BASELINE:
                continue
            lines.append(f"| {setting} | " + " | ".join(
                _cell((entry["metrics"].get(k) or {}).get("delta_vs_clip"), delta=True) for k in keys) + " |")
        lines.append("")
        vs_ping = (doc.get("aggregate_vs_clip_ping") or {}).get(split)
        if vs_ping and set(vs_ping["settings"]) - {BASELINE, SECOND_BASELINE}:
            lines += [f"Δ vs CLIP-PING defaults ({split}):", "",
                      "| setting | " + " | ".join(metric_label(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
            for setting, entry in vs_ping["settings"].items():
                if setting in (BASELINE, SECOND_BASELINE):
                    continue
                lines.append(f"| {setting} | " + " | ".join(
                    _cell((entry["metrics"].get(k) or {}).get("delta_vs_clip"), delta=True) for k in keys) + " |")
            lines.append("")
    if split_note := doc.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in split_note] + [""]

    rec = doc["recommendation"]
    lines += ["## Recommended defaults (chosen on the VALIDATION split only)", "", rec["rule"], ""]
    if rec["groups"]:
        lines += ["| choice | ranking on val (score mean ± std) | best | gain over default (paired) | recommended |",
                  "|---|---|---|---|---|"]
        for group, g in rec["groups"].items():
            ranking = ", ".join(f"{r['setting']} {r['val_score_mean']:.2f}"
                                + (f" ± {r['val_score_std']:.2f}" if r["val_score_std"] is not None else "")
                                for r in g["ranking"])
            gain = g["gain_over_reference"]
            gain_text = "–" if gain is None else _cell(gain, delta=True) + (
                "" if g["clear"] else " (one seed: no noise estimate, default kept)" if gain["std"] is None
                else " (within noise, default kept)")
            lines.append(f"| {group} | {ranking} | {g['best_on_val']} | {gain_text} | "
                         f"{g['recommended_setting']}: `{json.dumps(g['recommended_value'])}` |")
    else:
        lines.append("(no group with two or more settings in this profile)")
    lines.append("")

    cost = doc["cost"]
    lines += ["## Cost", "", "| stage | wall s | CPU s | peak RSS MB (process / largest child) |", "|---|---|---|---|"]
    for name, r in cost["stages"].items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {r.get('cpu_seconds', float('nan')):.1f} | "
                     f"{r['peak_rss_mb']:.0f} / {r.get('peak_rss_children_mb', 0):.0f} |")
    lines += ["", "| training setting | runs timed | s/step (wall incl. start-up) | CPU s/step | samples/s (logged) | "
              "train wall s (mean) | train peak RSS MB (process / worker) | eval s (val+test) | eval peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for setting, t in cost["training"].items():
        lines.append(f"| {setting} | {t['runs_timed']} | {_cell(t['s_per_step'])} | {_cell(t['cpu_s_per_step'])} | "
                     f"{_cell(t['samples_per_s_logged'])} | {t['train_seconds_mean']:.0f} | "
                     f"{t['train_peak_rss_mb']:.0f} / {t['train_peak_rss_children_mb']:.0f} | "
                     f"{t['eval_seconds_mean']:.0f} | {t['eval_peak_rss_mb']:.0f} |")
    lines.append("")
    if cost.get("step_time_ratio_clip_ping_over_clip"):
        lines.append(f"- step time CLIP-PING / CLIP: {cost.get('steady_step_time_ratio_clip_ping_over_clip', float('nan')):.3f} "
                     f"(steady state, from the logged samples/s after the first log interval); "
                     f"{cost['step_time_ratio_clip_ping_over_clip']:.3f} (wall time of the whole training stage, "
                     f"start-up included), {cost.get('cpu_time_ratio_clip_ping_over_clip', float('nan')):.3f} (CPU time "
                     "of the stage). Runs share the machine with whatever else runs: see the load averages")
    if cost.get("offline_over_one_clip_ping_run"):
        lines.append(f"- offline stage (extraction + neighbours, default teachers): "
                     f"{cost['offline_seconds_default_teachers']:.0f} s = "
                     f"{cost['offline_over_one_clip_ping_run']:.2f} x one CLIP-PING training run")
    lines.append(f"- wall time of this invocation: {doc['wall_seconds']:.0f} s (stages skipped as complete take ~0 s)")
    lines.append("")
    return "\n".join(lines)
