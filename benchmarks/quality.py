"""Quality benchmark of issue 7: plain CLIP against CLIP-PING (and its ablations), several seeds.

    .venv/bin/python benchmarks/quality.py --profile quick                 # OpenClipart, CLIP vs CLIP-PING, 3 seeds
    .venv/bin/python benchmarks/quality.py --profile full                  # + NN/XNN, top-k, queue, lambdas, heads, teacher
    .venv/bin/python benchmarks/quality.py --profile tiny --data synth     # minutes: every code path on tiny data
    .venv/bin/python benchmarks/quality.py --profile methods               # every method, paired vs CLIP and CLIP-PING
    .venv/bin/python benchmarks/quality.py --profile quick --dry-run       # print the plan only

Pipeline (every step is skipped when its output is complete, so an interrupted
benchmark is resumed by running the same command again):

1. data: the OpenClipart library (Debian ``openclipart-png`` + ``openclipart-svg``)
   converted by ``convert_openclipart`` into ``benchmarks/work/openclipart``, or
   the built-in synthetic set; then teacher feature banks (``extract_banks``,
   default teachers; a second bank per extra image teacher) and neighbour
   tables (``build_neighbors``, k >= 10).
2. training: every setting of the profile x every seed, same student, data,
   steps and batch, into ``OUT/runs/<setting>-seed<k>`` with ``resume="auto"``;
   a run folder holding ``eval.json`` is complete and skipped.
3. evaluation of every run on the test split (``eval.json``: zero-shot top-1/5
   on the taxonomy labels, I2T/T2I recall, linear probe) and on the val split
   (``eval_val.json``: zero-shot and retrieval; the val-split probe number is
   the probe's accuracy on val at the C it selects there, from ``eval.json``).
4. aggregation: mean and sample std over seeds per setting, paired deltas
   against plain CLIP, a recommendation of defaults picked on the VALIDATION
   split only, timings and peak memory of every stage. Written to
   ``benchmarks/results/quality_<profile>_<data>.{json,md}``; plots and the
   standard comparison under ``OUT/report`` (``clip_ping.report``).

Each stage runs in its own subprocess (this file with ``--stage-worker``), so
its wall time and peak resident memory (``ru_maxrss`` of the process, and of
its DataLoader workers separately) are measured alone.

Profiles are in ``benchmarks/quality_profiles.yaml``. The quick and full
profiles share their training options, so ``full`` reuses the clip and
clip-ping runs of ``quick`` in the same ``--out``. A run folder trained with
other options is refused, never silently reused.

Several invocations may share one ``--out`` (one per core, say, each with its
own ``--tag``): the preparation holds a lock the others wait for, and each run
is taken by one invocation only (a lock per run, released by the system if
its holder dies); the others skip it and move on.

This script is the command line and the stage workers' entry; the work is in its parts, one
job each: quality_plan.py (profiles, plan), quality_prepare.py (data, banks, neighbours),
quality_run.py (stages in subprocesses, runs under locks), quality_aggregate.py (metrics over
seeds, deltas, recommendation, cost) and quality_render.py (the markdown).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the quality_*.py parts beside this script
# the parts; the names quality_combine.py and the tests use stay reachable here (quality.X)
import quality_run  # noqa: E402, F401
from quality_plan import (  # noqa: E402, F401
    BASELINE, BenchError, PROFILES_FILE, RESULTS, ROOT, SECOND_BASELINE, WORK, _check_extract_options,
    _check_neighbor_options, _check_train_fraction, _comparable, _read_json, bank_dir_for, data_dir_for, load_profiles,
    make_plan, resolve_profile, subset_dir_for, subset_rows,
)
from quality_run import (  # noqa: E402, F401
    _cpu_s, _rss_mb, _worker_run, check_run_folder, exclusive, run_forwarding_stop_signals, train_and_evaluate,
)
from quality_prepare import (  # noqa: E402, F401
    _worker_data, _worker_extract, _worker_neighbors, prepare, prepare_neighbor_variant, top1_recall,
    write_train_subset,
)
from quality_aggregate import aggregate, collect, cost_summary, metric_label, recommend, run_metrics  # noqa: E402, F401
from quality_render import markdown  # noqa: E402, F401


WORKERS = {"data": _worker_data, "extract": _worker_extract, "neighbors": _worker_neighbors, "run": _worker_run}


def stage_worker(spec_path: str) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    t0, c0 = time.perf_counter(), _cpu_s()
    info = WORKERS[spec["stage"]](spec["payload"])
    result = {"seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(_cpu_s() - c0, 2), **_rss_mb(),
              "load_average": [round(x, 2) for x in os.getloadavg()], **info}
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick",
                        help="profile of quality_profiles.yaml (quick, full, duplicates, methods, approx-neighbors, tiny)")
    parser.add_argument("--data", default="openclipart", choices=("openclipart", "synth"))
    parser.add_argument("--out", default=None, help="work folder (default: benchmarks/work/quality_<data>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the profile's seeds")
    parser.add_argument("--steps", type=int, default=None, help="override the profile's training steps")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="override the training precision")
    parser.add_argument("--settings", nargs="+", default=None, help="override the profile's settings")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the results JSON and markdown")
    parser.add_argument("--tag", default=None,
                        help="suffix of the result files (default: 'bf16' when training in bf16, else none)")
    parser.add_argument("--profiles-file", default=str(PROFILES_FILE))
    parser.add_argument("--no-report", action="store_true", help="skip clip_ping.report (plots) under OUT/report")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--stage-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage_worker:
        return stage_worker(args.stage_worker)

    started = time.perf_counter()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        prof = resolve_profile(args.profile, args.data, spec=load_profiles(Path(args.profiles_file)), seeds=args.seeds,
                               steps=args.steps, settings=args.settings, precision=args.precision)
        out = Path(args.out) if args.out else WORK / f"quality_{args.data}"
        out = out.resolve()
        plan = make_plan(prof, out)
        if args.dry_run:
            print(json.dumps({"profile": {k: prof[k] for k in ("name", "data_name", "seeds", "settings", "train",
                                                               "neighbor_k", "data_options")},
                              "data_dir": plan["data_dir"], "banks": plan["banks"],
                              "runs": [r["run_dir"] for r in plan["runs"]]}, indent=2, default=str))
            return 0
        out.mkdir(parents=True, exist_ok=True)
        state_dir = out / "stages"
        invocations = _read_json(out / "invocations.json") or []
        command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:]))
        invocations.append({"date": date, "command": command})
        (out / "invocations.json").write_text(json.dumps(invocations, indent=2))

        print(f"[quality] profile {prof['name']}, data {prof['data_name']}: {len(plan['runs'])} runs "
              f"({len(prof['settings'])} settings x {len(prof['seeds'])} seeds) into {out}", flush=True)
        with exclusive(state_dir / "prepare.lock", wait=False) as first:
            if not first:
                print("[quality] another invocation is preparing the data, banks or neighbours; waiting", flush=True)
        with exclusive(state_dir / "prepare.lock", wait=True):
            records = prepare(prof, plan, state_dir)
        t_train = time.perf_counter()
        elsewhere = train_and_evaluate(prof, plan, state_dir)
        train_wall = time.perf_counter() - t_train
        if elsewhere:
            print(f"[quality] {len(elsewhere)} runs were left to another invocation ({', '.join(elsewhere)}); "
                  "the results below lack them until this command runs again after it", flush=True)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume (finished work is kept)", file=sys.stderr)
        return 130

    results = collect(plan)
    agg = aggregate(results, prof["settings"])
    n_train = sum(1 for _ in open(Path(plan["data_dir"]) / "train.csv", encoding="utf-8")) - 1
    import torch

    doc = {
        "date": date,
        "commands": [i["command"] for i in invocations],
        "invocations": invocations,
        "profile": {k: prof[k] for k in ("name", "data_name", "data_options", "seeds", "settings", "setting_specs",
                                         "train", "eval", "extract", "neighbor_k", "image_teacher", "text_teacher",
                                         "choices")},
        "data_dir": plan["data_dir"],
        "n_train": n_train,
        "epochs_equivalent": (prof["train"].get("steps") or 0) * prof["train"]["batch_size"] / max(n_train, 1),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "notes": [
            "zero-shot: the data set's taxonomy tasks (dataset.json), class prompts averaged over its templates",
            "linear probe (test): logistic regression on frozen image features of up to "
            f"{prof['eval'].get('probe_max_train', 2000)} train images, C selected on val; on the val split the "
            "number shown is the probe's val accuracy at the C it selects (slightly optimistic)",
            "retrieval: over the distinct images of the split; a hit on any caption of an image counts",
        ],
        "results": results,
        "aggregate": agg,
        # the same paired deltas against the CLIP-PING defaults (key "delta_vs_clip" holds the delta to that baseline)
        "aggregate_vs_clip_ping": (aggregate(results, prof["settings"], baseline=SECOND_BASELINE)
                                   if SECOND_BASELINE in prof["settings"] else None),
        "recommendation": recommend(agg, prof),
        "cost": cost_summary(results, records, prof["settings"], prof["image_teacher"]),
        "neighbor_variants": {Path(v).name: {**spec, "top1_recall_vs_exact":
                                             (records.get(f"neighbors:{Path(v).name}") or {}).get("top1_recall_vs_exact")}
                              for v, spec in plan["neighbor_variants"].items()},
        "wall_seconds": time.perf_counter() - started,
        "train_and_eval_wall_seconds": train_wall,
    }
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag if args.tag is not None else ("bf16" if prof["train"]["precision"] == "bf16" else "")
    stem = f"quality_{prof['name']}_{prof['data_name']}" + (f"_{tag}" if tag else "")
    (results_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str))
    text = markdown(doc)
    (results_dir / f"{stem}.md").write_text(text, encoding="utf-8")
    if not args.no_report and results:
        try:
            from clip_ping.report import build_report

            done = [r for r in results]
            index = build_report([r["run_dir"] for r in done], out / "report", names=[r["setting"] for r in done])
            print(f"[quality] plots and comparison: {index}")
        except Exception as exc:  # the report is a convenience; the results are already written
            print(f"[quality] warning: clip_ping.report failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    print(text)
    print(f"[quality] results: {results_dir / (stem + '.json')} and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
