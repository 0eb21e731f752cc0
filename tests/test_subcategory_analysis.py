"""benchmarks/subcategory_analysis.py on made-up results files and a tiny bank with copies: the pairing,
the noise figures, the per-class differences and the neighbour purity under each duplicate rule."""

import json
import shutil

import numpy as np
import pytest
from conftest import load_benchmark_script, write_random_bank


@pytest.fixture(scope="module")
def analysis():
    return load_benchmark_script("subcategory_analysis")


def _result(setting, seed, top1, per_class, config=None, head=None):
    cfg = {"method": "clip" if setting == "clip" else "clip-ping", "steps": 400, "seed": seed, **(config or {})}
    if head:
        cfg["head"] = head
    zs = {"subcategory": {"top1": top1, "mean_per_class": sum(per_class.values()) / len(per_class),
                          "per_class": per_class, "n": 10},
          "category": {"top1": top1 + 5, "mean_per_class": 0.0, "per_class": {}, "n": 10}}
    return {"setting": setting, "seed": seed, "teacher": "t", "config": cfg,
            "eval_val": {"zeroshot": zs}, "eval_test": {"zeroshot": zs}}


def _file(path, date, results, n_train=100):
    path.write_text(json.dumps({"date": date, "n_train": n_train, "profile": {"setting_specs": {}}, "results": results}))
    return path


def test_seeds_needed_matches_the_paired_t_test(analysis):
    # Cohen's d = 1 (std 3, effect 3): 10 pairs for 80 % power at 5 %, two-sided; a noisier delta needs more
    assert analysis.seeds_needed(3.0) == 10
    assert analysis.seeds_needed(6.0) > analysis.seeds_needed(3.0)
    assert analysis.seeds_needed(0.0) is None


def test_runs_are_paired_with_their_files_clip_and_the_seed_carries_the_delta(analysis, tmp_path):
    clip_top1 = {0: 13.0, 1: 6.0, 2: 11.0}
    clip = [_result("clip", s, clip_top1[s], {"a": clip_top1[s], "b": 0.0}) for s in range(3)]
    # the same guided value at every seed: the delta is CLIP's value, mirrored
    linear = [_result("clip-ping", s, 9.0, {"a": 0.0, "b": 20.0}) for s in range(3)]
    mlp = [_result("clip-ping", s, 10.0, {"a": 5.0, "b": 20.0}) for s in range(3)]
    files = [_file(tmp_path / "quality_a_x.json", "2026-12-01T00:00:00+00:00", clip + linear),  # linear by default
             _file(tmp_path / "quality_b_x.json", "2026-12-03T00:00:00+00:00", clip + mlp),  # MLP by default
             _file(tmp_path / "quality_c_x.json", "2026-12-03T00:00:00+00:00", clip, n_train=7)]  # other data
    runs, skipped = analysis.load_runs(files, n_train=100)
    assert len(runs) == 9  # the CLIP runs both files report are kept once
    assert len(skipped) == 1 and "quality_c_x.json" in skipped[0]
    assert sorted({r["head"] for r in runs if r["setting"] == "clip-ping"}) == ["linear", "mlp"]
    pairs = analysis.pairs_with_clip(runs)
    assert len(pairs) == 6 and all(p["clip"]["seed"] == p["run"]["seed"] for p in pairs)

    noise = analysis.noise(runs, pairs)["val"]
    table = noise["delta_by_setting"]
    assert table["clip-ping [linear head]"]["delta"]["values"] == [-4.0, 3.0, -2.0]
    assert table["clip-ping [mlp head]"]["delta"]["values"] == [-3.0, 4.0, -1.0]
    assert noise["clip_seed_std"] == pytest.approx(np.std([13.0, 6.0, 11.0], ddof=1))
    grid = noise["grid"]  # the two settings differ by a constant: seed and setting explain it all
    assert grid["share_of_variance_residual"] == pytest.approx(0.0, abs=1e-9)
    assert grid["share_of_variance_seed"] > 0.9 > grid["share_of_variance_setting"] > 0.0
    assert noise["grid"]["settings_losing_by_seed"] == {"0": "2/2", "1": "0/2", "2": "2/2"}
    clip_values = [13.0, 6.0, 11.0] * 2
    deltas = [-4.0, 3.0, -2.0, -3.0, 4.0, -1.0]
    assert noise["corr_delta_vs_clip_value"] == pytest.approx(np.corrcoef(clip_values, deltas)[0, 1])
    assert noise["share_of_pairs_losing"] == pytest.approx(4 / 6)

    per_class = analysis.per_class_deltas(pairs, "val")
    a, b = per_class["classes"]["a"], per_class["classes"]["b"]
    assert a["clip_accuracy"] == pytest.approx(10.0) and a["guided_accuracy"] == pytest.approx(2.5)
    assert a["share_losing"] == 1.0 and b["delta_accuracy"] == pytest.approx(20.0) and b["share_winning"] == 1.0
    only_mlp = analysis.per_class_deltas(pairs, "val", only_mlp=True)
    assert only_mlp["pairs"] == 3 and only_mlp["classes"]["a"]["guided_accuracy"] == pytest.approx(5.0)

    # the class every pair loses and that costs top-1 is the systematic one; its cost per method family
    per_class["classes"]["a"]["top1_contribution"] = -0.5
    per_class["classes"]["b"]["top1_contribution"] = 2.0
    assert analysis.systematic_classes(per_class) == ["a"]
    table = analysis.by_family_and_setting(pairs, runs, ["a"], {"a": 2, "b": 8}, 10)
    family = table["families"]["teacher + neighbours"]
    assert family["pairs"] == 6 and family["a"]["share_losing"] == 1.0
    assert family["top1_cost"] == pytest.approx(2 / 10 * (2.5 - 10.0))
    assert table["settings"]["clip-ping [mlp head]"]["top1_cost"] == pytest.approx(2 / 10 * (5.0 - 10.0))


def test_purity_under_each_duplicate_rule_counts_copies_apart(analysis, tiny_synth, tmp_path, monkeypatch):
    from clip_ping.data.table import open_table
    from clip_ping.knn import NeighborsConfig, build_neighbors

    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    bank = write_random_bank(data)
    # rows 0-3 are one caption four times: the same text feature, one text group
    text = np.load(bank / "text.npy")
    text[1:4] = text[0]
    np.save(bank / "text.npy", text)
    group = np.load(bank / "text_group.npy")
    group[1:4] = 0
    np.save(bank / "text_group.npy", group)
    build_neighbors(NeighborsConfig(banks=str(bank), k=3, method="exact", progress=False, overwrite=True))
    monkeypatch.setattr(analysis, "TASK", "color")
    monkeypatch.setattr(analysis, "COARSE", "shape")

    nn = analysis.top1_tables(bank)
    assert nn["stored_rule"] == "both" and set(nn["tables"]) == {"both", "same_side", "self"}
    assert not set(nn["tables"]["both"]["text"][:4]) & {0, 1, 2, 3}  # copies are never neighbours by default
    assert all(nn["tables"]["self"]["text"][i] in {0, 1, 2, 3} - {i} for i in range(4))  # only itself excluded

    props = analysis.class_properties(data, nn)
    color = np.asarray(open_table(data, "train").labels["color"]).astype(str)
    stored = np.load(bank / "neighbors_text.npy")[:, 0]
    for name in set(color):
        rows = np.flatnonzero(color == name)
        assert props[name]["text_purity"] == pytest.approx((color[stored[rows]] == name).mean())
        assert props[name]["train_rows"] == len(rows)
    for name in set(color):
        assert sum(props[name]["text_neighbour_classes"].values()) <= props[name]["train_rows"]
    overall = props["__overall__"]
    assert overall["self/text/neighbour_is_a_copy"] == pytest.approx(4 / len(color))
    assert overall["both/text/neighbour_is_a_copy"] == 0.0
    assert overall["both/text/wrong_pull"] == pytest.approx(1 - overall["both/text/purity"])

    gate = analysis.score_gate(data, nn, shares=(0.25,))
    for side in ("image", "text"):
        pure = color[nn["tables"]["both"][side]] == color
        auc = gate[side]["auc_score_vs_purity"]
        assert (auc is None) == (pure.all() or not pure.any())  # undefined when every neighbour is alike
        assert auc is None or 0.0 <= auc <= 1.0
        g = gate[side]["gates"][0]
        score = nn["scores"][side]
        assert g["min_score"] == pytest.approx(np.quantile(score, 0.25))
        assert g["kept_purity"] == pytest.approx(pure[score >= g["min_score"]].mean())
