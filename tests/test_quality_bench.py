"""Smoke test of benchmarks/quality.py: profiles, plan, aggregation, recommendation, markdown.

No training and no OpenClipart: eval results are made up. The end-to-end check
is `python benchmarks/quality.py --profile tiny --data synth` (a few minutes).
"""

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import load_benchmark_script


@pytest.fixture(scope="module")
def quality():
    return load_benchmark_script("quality")


@pytest.mark.parametrize("profile", ["quick", "full", "tiny"])
@pytest.mark.parametrize("data", ["openclipart", "synth"])
def test_profiles_resolve_and_plan(quality, profile, data, tmp_path):
    prof = quality.resolve_profile(profile, data)
    assert len(prof["seeds"]) >= 2 and "clip" in prof["settings"] and "clip-ping" in prof["settings"]
    assert prof["neighbor_k"] >= 10
    plan = quality.make_plan(prof, tmp_path)
    assert len(plan["runs"]) == len(prof["settings"]) * len(prof["seeds"])
    names = {Path(r["run_dir"]).name for r in plan["runs"]}
    assert "clip-seed0" in names and "clip-ping-seed0" in names
    for run in plan["runs"]:
        assert run["train"]["resume"] == "auto"  # continue a run when it has a checkpoint, else start
        assert (run["train"]["banks"] is None) == (run["train"].get("method") == "clip")
    if "teacher-lite2" in prof["settings"]:
        assert set(plan["banks"]) == {"efficientnet-lite0", "efficientnet-lite2"}
    if profile in ("quick", "full"):
        assert len(prof["seeds"]) >= 3


def test_quick_and_full_share_training_options(quality):
    # so that `full` reuses the clip and clip-ping runs of `quick`
    quick, full = quality.resolve_profile("quick", "openclipart"), quality.resolve_profile("full", "openclipart")
    assert quick["train"] == full["train"] and quick["seeds"] == full["seeds"]
    assert set(quick["settings"]) <= set(full["settings"])


def test_overrides_and_bad_input(quality):
    prof = quality.resolve_profile("quick", "synth", seeds=[4, 5], steps=7, settings=["clip", "topk5"], precision="bf16")
    assert prof["seeds"] == [4, 5] and prof["train"]["steps"] == 7 and prof["train"]["precision"] == "bf16"
    with pytest.raises(quality.BenchError, match="unknown setting"):
        quality.resolve_profile("quick", "synth", settings=["clip", "nope"])
    with pytest.raises(quality.BenchError, match="baseline"):
        quality.resolve_profile("quick", "synth", settings=["clip-ping"])
    with pytest.raises(quality.BenchError, match="unknown profile"):
        quality.resolve_profile("huge", "synth")


def _fake_eval(seed: int, boost: float) -> tuple[dict, dict]:
    def one(offset):
        return {"zeroshot": {"category": {"top1": 30 + boost + seed + offset}, "subcategory": {"top1": 10 + boost + offset}},
                "retrieval": {"image_to_text": {"R@1": 5 + boost, "R@5": 15 + boost},
                              "text_to_image": {"R@1": 4 + boost + 0.1 * seed, "R@5": 14 + boost}}}
    test = {**one(0), "linear_probe": {"category": {"accuracy": 50 + boost, "val_accuracy": 52 + boost}}}
    return test, one(1)


def test_aggregate_recommend_markdown(quality, tmp_path):
    prof = quality.resolve_profile("full", "synth", seeds=[0, 1, 2])
    boosts = {"clip": 0.0, "clip-ping": 1.0, "topk5": 3.0, "queue": 0.5}
    results = []
    for seed in prof["seeds"]:
        for setting, boost in boosts.items():
            ev_test, ev_val = _fake_eval(seed, boost + (0.3 * seed if setting == "queue" else 0.0))
            results.append({"setting": setting, "seed": seed, "metrics": quality.run_metrics(ev_test, ev_val),
                            "timing": {"train_seconds": 100.0 * (1.1 if setting != "clip" else 1.0),
                                       "train_cpu_seconds": 190.0, "train_steps_timed": 50,
                                       "train_peak_rss_mb": 1200.0, "eval_val_seconds": 5, "eval_test_seconds": 9},
                            "samples_per_s": 64.0})
    m = results[0]["metrics"]
    assert set(m) == {"test", "val"}
    assert m["val"]["probe/category"] == 52.0 and m["test"]["probe/category"] == 50.0  # val probe: C-selection accuracy
    agg = quality.aggregate(results, prof["settings"])
    clip_ping = agg["test"]["settings"]["clip-ping"]["metrics"]["zs/category/top1"]
    assert clip_ping["mean"] == pytest.approx(32.0) and clip_ping["std"] == pytest.approx(1.0)
    assert clip_ping["delta_vs_clip"]["mean"] == pytest.approx(1.0) and clip_ping["delta_vs_clip"]["std"] == pytest.approx(0.0)
    assert "nn-only" not in agg["test"]["settings"]  # settings without results are left out

    rec = quality.recommend(agg, prof)
    assert rec["split"] == "val"
    assert rec["groups"]["lambdas"]["recommended_setting"] == "clip-ping"
    assert rec["groups"]["neighbor_topk"]["recommended_setting"] == "topk5"  # +2 at every seed: clear
    assert rec["groups"]["neighbor_topk"]["recommended_value"] == 5
    queue = rec["groups"]["neighbor_source"]  # below the default on val: the default stays
    assert queue["best_on_val"] == "clip-ping" and queue["recommended_value"] == "dataset"

    cost = quality.cost_summary(results, {"extract:efficientnet-lite0": {"seconds": 60.0, "peak_rss_mb": 1900.0},
                                          "neighbors:efficientnet-lite0": {"seconds": 5.0, "peak_rss_mb": 600.0}},
                                prof["settings"], "efficientnet-lite0")
    assert cost["step_time_ratio_clip_ping_over_clip"] == pytest.approx(1.1)
    assert cost["offline_seconds_default_teachers"] == pytest.approx(65.0)

    doc = {"profile": prof, "date": "2026-01-01T00:00:00+00:00", "commands": ["python benchmarks/quality.py"],
           "machine": {"cpus": 2, "processor": "x86_64", "torch": "2", "load_average_start": [0.1]},
           "epochs_equivalent": 8.0, "n_train": 6400, "aggregate": agg, "recommendation": rec, "cost": cost,
           "wall_seconds": 1.0, "notes": ["n"]}
    text = quality.markdown(doc)
    assert "VALIDATION split only" in text and "| clip-ping | 3 |" in text and "Δ vs plain CLIP (test)" in text
    json.dumps(doc, default=str)


def test_refuses_run_folder_with_other_options(quality, tmp_path):
    prof = quality.resolve_profile("tiny", "synth", settings=["clip"], seeds=[0])
    run = quality.make_plan(prof, tmp_path)["runs"][0]
    run_dir = Path(run["run_dir"])
    run_dir.mkdir(parents=True)
    config = {**run["train"], "steps": 999, "workers": 7}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(quality.BenchError, match="steps"):
        quality.check_run_folder(run)
    config["steps"] = run["train"]["steps"]  # bookkeeping keys (workers) may differ
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    quality.check_run_folder(run)


def test_methods_profile_resolves_to_valid_runs_of_every_method(quality, tmp_path):
    from clip_ping.config import from_dict
    from clip_ping.training.trainer import TrainConfig

    prof = quality.resolve_profile("methods", "openclipart")
    expected = {"clip", "clip-ping", "a-clip-ping", "a-clip-ping-queue", "xnn-other", "student-table",
                "collisions-mask", "collisions-positives", "declip-nns", "slip", "relational"}
    assert set(prof["settings"]) == expected and prof["seeds"] == [0, 1, 2]
    assert prof["train"]["model"] == "ViT-XXS-8-64" and prof["train"]["steps"] == 400
    plan = quality.make_plan(prof, tmp_path)
    assert plan["data_dir"].endswith("openclipart-v2")  # the rebuilt benchmark: deduplicated, split by caption
    assert len(plan["runs"]) == len(expected) * 3
    for run in plan["runs"]:
        cfg = from_dict(TrainConfig, {k: v for k, v in run["train"].items() if k != "progress"})  # validates every key
        assert (cfg.banks is None) == (cfg.method in ("clip", "declip-nns", "slip"))
    # the paired deltas against the CLIP-PING defaults reach the report
    results = []
    for seed in prof["seeds"]:
        for setting, boost in {"clip": 0.0, "clip-ping": 1.0, "slip": 0.5}.items():
            ev_test, ev_val = _fake_eval(seed, boost)
            results.append({"setting": setting, "seed": seed, "metrics": quality.run_metrics(ev_test, ev_val)})
    vs_ping = quality.aggregate(results, prof["settings"], baseline="clip-ping")
    slip = vs_ping["val"]["settings"]["slip"]["metrics"]["i2t/R@1"]
    assert slip["delta_vs_clip"]["mean"] == pytest.approx(-0.5)
    doc = {"profile": prof, "date": "d", "commands": ["c"], "epochs_equivalent": 8.0, "n_train": 6400,
           "machine": {"cpus": 2, "processor": "x", "torch": "2", "load_average_start": [0.1]},
           "aggregate": quality.aggregate(results, prof["settings"]), "aggregate_vs_clip_ping": vs_ping,
           "recommendation": quality.recommend(quality.aggregate(results, prof["settings"]), prof),
           "cost": {"stages": {}, "training": {}}, "wall_seconds": 1.0}
    assert "Δ vs CLIP-PING defaults (val)" in quality.markdown(doc)


def _doc(quality, seeds, boosts, date="2026-01-01T00:00:00+00:00"):
    """A quality.py result document with made-up evaluations for ``seeds`` of the quick profile."""
    prof = quality.resolve_profile("quick", "openclipart", seeds=seeds)
    results = []
    for seed in seeds:
        for setting in prof["settings"]:
            ev_test, ev_val = _fake_eval(seed, boosts[setting][seed])
            results.append({"setting": setting, "seed": seed, "config": {**prof["train"], "seed": seed,
                                                                         "data": f"/work/{date}/data"},
                            "metrics": quality.run_metrics(ev_test, ev_val), "samples_per_s": 60.0,
                            "timing": {"train_seconds": 100.0, "train_cpu_seconds": 150.0, "train_steps_timed": 50}})
    return {"date": date, "commands": [f"python benchmarks/quality.py --seeds {seeds}"], "profile": prof,
            "n_train": 6371, "epochs_equivalent": 8.0, "data_dir": "/work/x", "wall_seconds": 10.0,
            "machine": {"cpus": 2, "processor": "x", "torch": "2", "load_average_start": [1.0, 2.0, 3.0]},
            "results": results, "cost": {"stages": {}}, "notes": ["n"]}


def test_combine_seeds_from_separate_files(quality):
    combine = load_benchmark_script("quality_combine")
    boosts = {"clip": {0: 0.0, 1: 1.0, 2: 0.5}, "clip-ping": {0: 2.0, 1: 1.5, 2: 4.0}}
    a, b = _doc(quality, [0, 1], boosts), _doc(quality, [2], boosts, date="2026-02-02T00:00:00+00:00")
    doc = combine.combine([a, b], ["a.json", "b.json"])
    assert doc["profile"]["seeds"] == [0, 1, 2]
    # T2I R@1 is 4 + boost + 0.1 seed: paired deltas 2.0, 0.5, 3.5 over the three seeds
    delta = doc["aggregate"]["test"]["settings"]["clip-ping"]["metrics"]["t2i/R@1"]["delta_vs_clip"]
    assert delta["n"] == 3 and delta["mean"] == pytest.approx(2.0) and delta["std"] == pytest.approx(1.5)
    text = quality.markdown(doc)
    assert "| clip-ping | 3 |" in text and "a.json (seeds [0, 1]" in text and "b.json (seeds [2]" in text

    with pytest.raises(combine.CombineError, match="setting clip seed 0 is in both"):
        combine.combine([a, _doc(quality, [0], boosts)], ["a.json", "c.json"])
    other = _doc(quality, [2], boosts)
    other["profile"]["train"] = {**other["profile"]["train"], "steps": 999}
    with pytest.raises(combine.CombineError, match="profile key 'train'"):
        combine.combine([a, other], ["a.json", "d.json"])
    other = _doc(quality, [2], boosts)
    other["results"][1]["config"]["lr"] = 0.5
    with pytest.raises(combine.CombineError, match="setting clip-ping was trained with another config"):
        combine.combine([a, other], ["a.json", "e.json"])


def test_combine_keeps_only_the_settings_asked_for(quality):
    """A slow setting run with other companions at each seed is pooled over the settings every file holds."""
    combine = load_benchmark_script("quality_combine")
    boosts = {"clip": {0: 0.0, 1: 1.0}, "clip-ping": {0: 2.0, 1: 1.5}}
    a, b = _doc(quality, [0], boosts), _doc(quality, [1], boosts)
    b = combine.restrict(b, ["clip", "clip-ping"], "b.json")
    a["profile"]["settings"] = a["profile"]["settings"] + ["slip"]  # a ran one more setting than b
    a["profile"]["setting_specs"] = {**a["profile"]["setting_specs"], "slip": {"method": "slip"}}
    with pytest.raises(combine.CombineError, match="profile key 'settings'"):
        combine.combine([a, b], ["a.json", "b.json"])
    doc = combine.combine([a, b], ["a.json", "b.json"], settings=["clip", "clip-ping"])
    assert doc["profile"]["settings"] == ["clip", "clip-ping"] and doc["profile"]["seeds"] == [0, 1]
    delta = doc["aggregate"]["test"]["settings"]["clip-ping"]["metrics"]["t2i/R@1"]["delta_vs_clip"]
    assert delta["n"] == 2 and delta["mean"] == pytest.approx(1.25)
    with pytest.raises(combine.CombineError, match="b.json has no setting slip"):
        combine.combine([a, b], ["a.json", "b.json"], settings=["clip", "slip"])
    with pytest.raises(combine.CombineError, match="must include the baseline"):
        combine.combine([a, b], ["a.json", "b.json"], settings=["clip-ping"])


def test_combine_fills_a_key_older_files_left_at_its_default_only_when_told(quality):
    combine = load_benchmark_script("quality_combine")
    boosts = {"clip": {0: 0.0, 1: 1.0}, "clip-ping": {0: 2.0, 1: 1.5}}
    old, new = _doc(quality, [0], boosts), _doc(quality, [1], boosts)
    new["profile"]["train"] = {**new["profile"]["train"], "head": "linear"}  # the profile made it explicit
    for run in new["results"]:
        run["config"]["head"] = "linear"
    with pytest.raises(combine.CombineError, match="profile key 'train'"):
        combine.combine([old, new], ["old.json", "new.json"])
    doc = combine.combine([old, new], ["old.json", "new.json"], assumed=combine.parse_assumptions(["head=linear"]))
    assert doc["profile"]["seeds"] == [0, 1] and "assumed for files that do not name them: {'head': 'linear'}" in doc["notes"]
    # a file that names the key with another value is still another experiment
    with pytest.raises(combine.CombineError, match="profile key 'train'"):
        combine.combine([old, new], ["old.json", "new.json"], assumed={"head": "mlp"})
    with pytest.raises(combine.CombineError, match="KEY=VALUE"):
        combine.parse_assumptions(["head"])


def test_approximate_neighbour_setting_gets_its_own_table_over_the_same_bank(quality, tmp_path):
    prof = quality.resolve_profile("approx-neighbors", "openclipart")
    assert prof["settings"] == ["clip", "clip-ping", "clip-ping-ivf-nprobe4"]
    plan = quality.make_plan(prof, tmp_path)
    bank = Path(plan["banks"]["efficientnet-lite0"])
    (variant, spec), = plan["neighbor_variants"].items()
    assert Path(variant) == bank.parent / "banks-nn-methodivf-nprobe4" and spec["source"] == str(bank)
    assert spec["options"] == {"method": "ivf", "nprobe": 4}
    banks_of = {r["setting"]: r["train"]["banks"] for r in plan["runs"] if r["seed"] == 0}
    assert banks_of == {"clip": None, "clip-ping": str(bank), "clip-ping-ivf-nprobe4": variant}
    with pytest.raises(quality.BenchError, match="search options"):
        quality._check_neighbor_options("s", {"nprobe": 4, "banks": "elsewhere"})


def test_setting_with_its_own_extraction_options_gets_its_own_bank(quality, tmp_path):
    prof = quality.resolve_profile("bank-precision", "openclipart")
    plan = quality.make_plan(prof, tmp_path)
    default = Path(plan["banks"]["efficientnet-lite0"])
    bf16 = Path(plan["banks"]["efficientnet-lite0+precisionbf16"])
    assert bf16 == default.parent / "banks-precisionbf16"
    specs = plan["bank_specs"]
    assert specs["efficientnet-lite0"]["extract"] == prof["extract"]
    assert specs["efficientnet-lite0+precisionbf16"] == {"image_teacher": "efficientnet-lite0",
                                                         "data": plan["data_dir"],
                                                         "extract": {**prof["extract"], "precision": "bf16"}}
    banks_of = {r["setting"]: r["train"]["banks"] for r in plan["runs"] if r["seed"] == 1}
    assert banks_of == {"clip": None, "clip-ping": str(default), "clip-ping-bank-bf16": str(bf16)}
    assert all("extract" not in r["train"] for r in plan["runs"])  # not a training option
    for bad in ({"precision": "bf16", "out": "elsewhere"}, {}, "bf16"):
        with pytest.raises(quality.BenchError, match="extraction options"):
            quality._check_extract_options("s", bad)


def test_data_curve_trains_both_methods_on_one_nested_subset_with_its_own_banks(quality, tmp_path):
    prof = quality.resolve_profile("curves-data", "openclipart")
    plan = quality.make_plan(prof, tmp_path)
    full = Path(plan["data_dir"])
    quarter, half = quality.subset_dir_for(full, 0.25), quality.subset_dir_for(full, 0.5)
    assert plan["subsets"] == {str(quarter): 0.25, str(half): 0.5}
    assert plan["banks"] == {"efficientnet-lite0": str(full / "banks"),
                             "efficientnet-lite0@train25pct": str(quarter / "banks"),
                             "efficientnet-lite0@train50pct": str(half / "banks")}
    assert plan["bank_specs"]["efficientnet-lite0@train25pct"]["data"] == str(quarter)
    for seed in prof["seeds"]:
        runs = {r["setting"]: r for r in plan["runs"] if r["seed"] == seed}
        # the same rows for both methods; CLIP-PING's neighbours from the subset's own bank
        assert runs["clip-train25"]["train"]["data"] == runs["clip-ping-train25"]["train"]["data"] == str(quarter)
        assert runs["clip-ping-train25"]["train"]["banks"] == str(quarter / "banks")
        assert runs["clip-ping-train50"]["train"]["banks"] == str(half / "banks")
        assert runs["clip-ping"]["train"]["banks"] == str(full / "banks") and runs["clip"]["train"]["data"] == str(full)
        # the same epochs: steps scale with the data; every run is evaluated on the full set
        assert [runs[s]["train"]["steps"] for s in ("clip-train25", "clip-train50", "clip")] == [100, 200, 400]
        assert {r["eval_data"] for r in runs.values()} == {str(full)}
    with pytest.raises(quality.BenchError, match="train_fraction"):
        quality._check_train_fraction("s", 1.5)


def test_train_subsets_are_nested_fixed_and_keep_the_other_splits(quality, tmp_path):
    rows = {f: quality.subset_rows(1000, f) for f in (0.25, 0.5, 1.0)}
    assert [len(r) for r in rows.values()] == [250, 500, 1000]
    assert set(rows[0.25]) < set(rows[0.5]) < set(rows[1.0]) and rows[0.25] == sorted(rows[0.25])
    assert quality.subset_rows(1000, 0.25) == rows[0.25] != list(range(250))  # fixed, and not the file's head
    assert quality.subset_rows(1000, 0.25, seed=1) != rows[0.25]

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "banks").mkdir()
    lines = ["filepath,caption,category"] + [f'images/{i}.png,"a caption, with a comma {i}",c{i % 3}'
                                             for i in range(40)]
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    (data / "val.csv").write_text("filepath,caption\nimages/v.png,val\n")
    subset = quality.write_train_subset(data, 0.25)
    assert subset == quality.subset_dir_for(data, 0.25) == tmp_path / "data-train25pct"
    kept = (subset / "train.csv").read_text().splitlines()
    assert kept[0] == lines[0] and kept[1:] == [lines[1 + i] for i in quality.subset_rows(40, 0.25)]
    assert (subset / "val.csv").is_symlink() and (subset / "images").resolve() == (data / "images").resolve()
    assert not (subset / "banks").exists()  # its banks are built on its own rows
    assert json.loads((subset / "subset.json").read_text())["rows"] == 10
    (subset / "train.csv").write_text("changed")  # a complete subset folder is kept as it is
    assert quality.write_train_subset(data, 0.25) == subset and (subset / "train.csv").read_text() == "changed"


def test_top1_recall_counts_tied_neighbours_as_found(quality, tmp_path):
    import numpy as np

    exact, other = tmp_path / "exact", tmp_path / "other"
    for folder, image, text in ((exact, [0.9, 0.8, 0.7, 0.5], [0.6, 0.6, 0.6, 0.6]),
                                (other, [0.9, 0.8, 0.6, 0.5], [0.6, 0.5, 0.6, 0.6 - 1e-7])):
        folder.mkdir()
        for side, top1 in (("image", image), ("text", text)):
            np.save(folder / f"neighbors_{side}_scores.npy", np.array([[s, s - 0.1] for s in top1], np.float32))
    # image: row 2 found a worse neighbour; text: row 1 did, row 3 a tie within float rounding
    assert quality.top1_recall(exact, other) == {"image": 0.75, "text": 0.75}


def test_neighbour_variant_links_the_bank_and_searches_on_its_own(quality, tiny_banked, tmp_path):
    import numpy as np

    bank = tiny_banked / "banks"
    variant = tmp_path / "banks-nn-methodexact"
    spec = {"source": str(bank), "teacher": "t", "options": {"method": "exact"}}
    result = quality.prepare_neighbor_variant(variant, spec, 3, None, tmp_path / "stages")
    assert (variant / "image.npy").is_symlink() and not (variant / "neighbors_image.npy").is_symlink()
    assert result["top1_recall_vs_exact"] == {"image": 1.0, "text": 1.0}
    assert np.array_equal(np.load(variant / "neighbors_text.npy"), np.load(bank / "neighbors_text.npy"))
    # kept on a second call, the record returned as it was
    assert quality.prepare_neighbor_variant(variant, spec, 3, result, tmp_path / "stages") is result


def test_quality_pairs_gives_seed_paired_deltas_between_any_two_settings(tmp_path, capsys):
    pairs = load_benchmark_script("quality_pairs")
    runs = []
    for seed, (a, b) in enumerate([(14.0, 12.0), (15.0, 12.0), (13.0, 13.0)]):
        runs.append({"setting": "clip-ping-dup-mask", "seed": seed, "metrics": {"test": {"i2t/R@1": a}}})
        runs.append({"setting": "clip-dup-mask", "seed": seed, "metrics": {"test": {"i2t/R@1": b}}})
    runs.append({"setting": "clip-dup-mask", "seed": 7, "metrics": {"test": {"i2t/R@1": 99.0}}})  # unpaired: ignored
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": runs}))
    assert pairs.main([str(path), "clip-ping-dup-mask:clip-dup-mask", "--splits", "test"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| clip-ping-dup-mask")][0]
    assert row.split(" | ")[2:4] == ["3", "+1.67 ± 1.53"]  # differences 2, 3, 0
    assert pairs.main([str(path), "clip-ping:clip"]) == 2  # unknown settings are refused


def test_two_invocations_share_an_out_folder_without_running_a_run_twice(quality, tmp_path, monkeypatch):
    prof = quality.resolve_profile("tiny", "synth", settings=["clip"], seeds=[0, 1, 2])
    plan = quality.make_plan(prof, tmp_path)
    state_dir = tmp_path / "stages"
    ran = []

    def fake_run_stage(stage, payload, tag, state):
        ran.append(tag)
        other = Path(plan["runs"][2]["run_dir"])  # meanwhile, "another invocation" finishes seed 2
        other.mkdir(parents=True, exist_ok=True)
        for name in ("eval.json", "eval_val.json"):
            (other / name).write_text("{}")
        return {}

    monkeypatch.setattr(quality.quality_run, "run_stage", fake_run_stage)  # where train_and_evaluate finds it
    with quality.exclusive(state_dir / "run-clip-seed0.lock", wait=False) as held:  # "another invocation" runs seed 0
        assert held
        elsewhere = quality.train_and_evaluate(prof, plan, state_dir)
    assert ran == ["run-clip-seed1"] and elsewhere == ["clip-seed0"]
    with quality.exclusive(state_dir / "run-clip-seed0.lock", wait=False) as free:  # released with its block
        assert free


def test_a_run_lock_is_released_when_its_holder_is_killed(quality, tmp_path):
    import signal
    import subprocess
    import sys

    lock = tmp_path / "run-x.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"h = open({str(lock)!r}, 'a'); fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with quality.exclusive(lock, wait=False) as mine:
            assert not mine
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        with quality.exclusive(lock, wait=False) as mine:
            assert mine
    finally:
        holder.kill()
        holder.stdout.close()


def test_stopping_an_invocation_stops_its_stage_worker_and_waits_for_it(quality, tmp_path):
    """kill of quality.py reaches the worker (which stops cleanly) instead of leaving it running, unlocked."""
    ready, log = tmp_path / "ready", tmp_path / "worker.log"
    worker = (
        "import signal, sys, time, pathlib\n"
        f"log = pathlib.Path({str(log)!r})\n"
        "def stop(signum, frame):\n"
        "    time.sleep(0.3)  # a step finishing and its checkpoint being written\n"
        "    log.write_text('stopped by ' + signal.Signals(signum).name)\n"
        "    sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
        "log.write_text('never stopped')\n"
    )

    def kill_when_ready():
        for _ in range(200):
            if ready.exists():
                break
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=kill_when_ready)
    killer.start()
    returncode, stopped_by = quality.run_forwarding_stop_signals([sys.executable, "-c", worker])
    killer.join()
    assert stopped_by == "SIGTERM" and returncode == 3
    assert log.read_text() == "stopped by SIGTERM"  # the worker finished its stop before the invocation went on
    assert signal.getsignal(signal.SIGTERM) is before  # this process's own handler is back
    assert quality.run_forwarding_stop_signals([sys.executable, "-c", "pass"]) == (0, None)


def test_curves_pair_each_point_by_seed_and_skip_seeds_one_side_lacks(tmp_path):
    curves = load_benchmark_script("curves")

    def run(setting, seed, score):
        return {"setting": setting, "seed": seed, "metrics": {"val": {"score": score}, "test": {"score": score + 1}}}

    results = [run("clip", 0, 10.0), run("clip", 1, 12.0), run("clip", 2, 11.0),
               run("clip-ping", 0, 13.0), run("clip-ping", 1, 13.0)]  # seed 2 of clip-ping not finished
    point = curves.paired_point(results, "clip", "clip-ping")
    val = point["val"]["score"]
    assert val["seeds"] == [0, 1] and val["base"]["mean"] == 11.0 and val["other"]["mean"] == 13.0
    assert val["delta"]["mean"] == 2.0 and val["delta"]["values"] == [3.0, 1.0]
    assert point["test"]["score"]["delta"]["mean"] == 2.0 and "i2t/R@1" not in point["val"]
    assert curves.paired_point(results, "clip", "teacher-lite2") is None


def test_curves_pair_the_subcategory_fix_with_clip_and_with_the_defaults_by_seed(tmp_path):
    """Runs come from a results file when trained with the plan's options; one trained otherwise is left out."""
    curves = load_benchmark_script("curves")
    quality = curves.quality
    plan = quality.make_plan(quality.resolve_profile("subcategory-fix", "openclipart"), tmp_path / "work")
    value = {"clip": 10.0, "clip-ping": 12.0, "lambda-0.25": 13.0}
    results = [{"setting": r["setting"], "seed": r["seed"], "config": quality._comparable(r["train"]),
                "metrics": {"val": {"t2i/R@1": value[r["setting"]] + r["seed"]},
                            "test": {"t2i/R@1": value[r["setting"]] - r["seed"]}}} for r in plan["runs"]]
    results[-1]["config"] = {**results[-1]["config"], "lr": 0.5}  # the last run trained with another lr
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"date": "2026-12-08", "results": results}))
    fix = curves.subcategory_fix(tmp_path / "work", "openclipart", [reference])
    last = plan["runs"][-1]
    assert fix["setting"] == "lambda-0.25" and last["setting"] == "lambda-0.25"
    vs_clip = fix["vs_clip"]["val"]["t2i/R@1"]
    assert vs_clip["delta"]["mean"] == 3.0 and last["seed"] not in vs_clip["seeds"] and len(vs_clip["seeds"]) == 2
    assert fix["vs_clip_ping"]["test"]["t2i/R@1"]["delta"]["values"] == [1.0, 1.0]
    assert "subcategory fix" in curves.markdown({"date": "d", "runs_found": 0, "out": "o", "curves": {},
                                                  "train": {"model": "m", "batch_size": 1, "lr": 1},
                                                  "subcategory_fix": fix})


def test_curves_sort_each_top1_neighbour_by_the_labels_it_shares(tiny_banked):
    import csv

    import numpy as np

    curves = load_benchmark_script("curves")
    rows = list(csv.DictReader(open(tiny_banked / "train.csv", encoding="utf-8")))
    coarse, fine = np.array([r["shape"] for r in rows]), np.array([r["color"] for r in rows])
    purity = curves.subcategory_purity(tiny_banked / "banks", tiny_banked, coarse="shape", fine="color")
    for side in ("image", "text"):
        j = np.load(tiny_banked / "banks" / f"neighbors_{side}.npy")[:, 0]
        both = (coarse[j] == coarse) & (fine[j] == fine)
        got = purity[side]
        assert got["same_subcategory"] == pytest.approx(both.mean())
        assert got["other_category"] == pytest.approx((coarse[j] != coarse).mean())
        assert sum(got.values()) == pytest.approx(1.0)
    assert purity["rows"] == len(rows) and purity["categories"] == len(set(coarse))
    assert curves.subcategory_purity(tiny_banked / "banks", tiny_banked) is None  # no category columns here


def test_curves_take_a_missing_point_from_an_earlier_results_file_only_when_trained_alike(quality, tmp_path):
    curves = load_benchmark_script("curves")
    plan = quality.make_plan(quality.resolve_profile("curves", "openclipart"), tmp_path / "out")
    planned = {(r["setting"], r["seed"]): quality._comparable(r["train"]) for r in plan["runs"]}

    def run(setting, seed, **changes):
        config = {**planned.get((setting, seed), planned[("clip-ping", seed)]), "data": "/elsewhere/openclipart-v2",
                  **changes}
        return {"setting": setting, "seed": seed, "config": config, "metrics": {"val": {"score": float(seed)}}}

    here = [run("clip-ping", 0)]
    earlier = tmp_path / "quality_quick_openclipart.json"
    earlier.write_text(json.dumps({"date": "2026-12-06", "results": [
        run("clip", 0), run("clip-ping", 0), run("clip", 1, steps=1200), run("queue", 0, method="clip-ping")]}))
    results, notes = curves.with_reference_runs(list(here), plan, [earlier])
    taken = [(r["setting"], r["seed"], r.get("source")) for r in results]
    # clip seed 0 fills the gap; the run found here wins over the file's; other options or settings are refused
    assert taken == [("clip-ping", 0, None), ("clip", 0, "quality_quick_openclipart.json (2026-12-06)")]
    assert any("clip seed 1 not used (trained with other options)" in n for n in notes)
