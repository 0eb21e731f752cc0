"""`clip-ping report` on small fake runs written here: every file, and numbers equal to the runs' JSON."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clip_ping.demo import write_demo_neighbor_page
from clip_ping.errors import ConfigError, DataError
from clip_ping.report import ReportConfig, build_report, format_value, report_from_config


def _eval_json(offset: float) -> dict:
    """An eval.json as `clip-ping eval` writes it, with numbers shifted by ``offset``."""
    return {
        "split": "test", "n_images": 100, "n_texts": 200, "n_undecodable_images": 0, "seconds": 3.2,
        "zeroshot": {
            "shape": {"top1": 40.0 + offset, "top5": 90.0 + offset / 2, "mean_per_class": 39.0 + offset,
                      "per_class": {"circle": 50.0 + offset, "square": 30.0 + offset}, "n": 100, "n_unknown_label": 0},
            "count": {"top1": 60.5 + offset, "mean_per_class": 58.25 + offset,
                      "per_class": {"one": 70.0, "two": 46.5 + 2 * offset}, "n": 100, "n_unknown_label": 0},
        },
        "retrieval": {
            "image_to_text": {"R@1": 10.0 + offset, "R@5": 30.0 + offset, "R@10": 45.0 + offset,
                              "mean_rank": 20.0 - offset, "median_rank": 12.0},
            "text_to_image": {"R@1": 12.0 + offset, "R@5": 33.0 + offset, "R@10": 47.0 + offset,
                              "mean_rank": 18.5 - offset, "median_rank": 11.0},
            "n_images": 100, "n_texts": 200,
        },
        "linear_probe": {"shape": {"accuracy": 70.0 + offset, "C": 10.0, "val_accuracy": 68.0 + offset,
                                   "val_accuracy_by_C": {"1": 60.0, "10": 68.0}, "converged": True,
                                   "n_train": 500, "n_val": 50, "n_test": 100, "n_classes": 2}},
    }


def _write_run(folder: Path, method: str, seed: int, offset: float, steps: int = 30) -> Path:
    folder.mkdir(parents=True)
    lam = 0.0 if method == "clip" else 0.5
    config = {"data": "data/synth", "out": str(folder), "method": method, "model": "ViT-XXS-8-64",
              "lambda_nn": 0.5, "lambda_xnn": 0.5, "seed": seed, "lr": 0.001, "workers": 2}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(10, steps + 1, 10):
            clip = 4.0 / step + 0.01 * seed
            record = {"step": step, "epoch": 0, "lr": 1e-3 * step / steps, "loss": clip + lam * 2 * clip,
                      "loss_clip": clip, "loss_nn": clip * 1.1, "loss_xnn": clip * 1.2, "logit_scale": 14.3 + step / 10,
                      "samples_per_s": 500.0 + seed, "skipped_images": 0}
            f.write(json.dumps(record) + "\n")
    (folder / "eval.json").write_text(json.dumps(_eval_json(offset)))
    return folder


def _table_cells(markdown: str) -> dict[str, list[str]]:
    """Row label -> cells, from every markdown table in the report."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| metric"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1))


def test_report_of_two_settings_with_two_seeds(tmp_path):
    runs_dir = tmp_path / "runs"
    # seeds 0 and 1 of each method; offsets make the seeds (and the methods) differ
    runs = [_write_run(runs_dir / "clip-seed0", "clip", 0, 0.0),
            _write_run(runs_dir / "clip-ping-seed0", "clip-ping", 0, 3.0),
            _write_run(runs_dir / "clip-seed1", "clip", 1, 1.0),
            _write_run(runs_dir / "clip-ping-seed1", "clip-ping", 1, 5.0)]
    # a neighbour page in the run's bank folder is linked from index.html
    (runs[1] / "banks").mkdir()
    (runs[1] / "banks" / "neighbors.html").write_text("<html>neighbours</html>")
    out = tmp_path / "report"
    index = build_report(runs, out)

    assert index == out / "index.html"
    for name in ("report.md", "results.json", "training_curves.png", "metrics_bar.png", "index.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in ("training_curves.png", "metrics_bar.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["settings"]] == ["clip", "clip-ping"]
    assert [s["seeds"] for s in results["settings"]] == [[0, 1], [0, 1]]
    metrics = results["metrics"]

    # every metric of eval.json is there, and mean/std over the two seeds are right
    evals = {m: [json.loads((r / "eval.json").read_text()) for r in runs if r.name.rsplit("-seed", 1)[0] == m]
             for m in ("clip", "clip-ping")}
    paths = {
        "zeroshot/shape/top1": lambda e: e["zeroshot"]["shape"]["top1"],
        "zeroshot/shape/top5": lambda e: e["zeroshot"]["shape"]["top5"],
        "zeroshot/count/mean_per_class": lambda e: e["zeroshot"]["count"]["mean_per_class"],
        "zeroshot/count/per_class/two": lambda e: e["zeroshot"]["count"]["per_class"]["two"],
        "retrieval/image_to_text/R@1": lambda e: e["retrieval"]["image_to_text"]["R@1"],
        "retrieval/text_to_image/R@10": lambda e: e["retrieval"]["text_to_image"]["R@10"],
        "retrieval/text_to_image/mean_rank": lambda e: e["retrieval"]["text_to_image"]["mean_rank"],
        "retrieval/image_to_text/median_rank": lambda e: e["retrieval"]["image_to_text"]["median_rank"],
        "linear_probe/shape/accuracy": lambda e: e["linear_probe"]["shape"]["accuracy"],
    }
    rows = _table_cells((out / "report.md").read_text())
    for key, get in paths.items():
        means = {}
        for method in ("clip", "clip-ping"):
            values = [get(e) for e in evals[method]]
            mean, std = _mean_std(values)
            stats = metrics[key]["settings"][method]
            assert stats["values"] == values and stats["n"] == 2
            assert stats["mean"] == pytest.approx(mean) and stats["std"] == pytest.approx(std)
            means[method] = mean
        assert metrics[key]["delta"] == pytest.approx(means["clip-ping"] - means["clip"])
        # the markdown cell shows the same numbers: "mean ± std", and the signed delta
        label = next(lbl for lbl in rows if lbl.rsplit(" ", 1)[0] == metrics[key]["label"])
        clip_cell, ping_cell, delta_cell = rows[label]
        for cell, method in ((clip_cell, "clip"), (ping_cell, "clip-ping")):
            mean_text, std_text = cell.split(" ± ")
            assert float(mean_text) == pytest.approx(metrics[key]["settings"][method]["mean"], abs=0.005)
            assert float(std_text) == pytest.approx(metrics[key]["settings"][method]["std"], abs=0.005)
        assert float(delta_cell) == pytest.approx(metrics[key]["delta"], abs=0.005)

    # a hand-computed case: shape top-1 of clip is 40 and 41 -> 40.5 ± 0.71, clip-ping 43 and 45 -> 44.0 ± 1.41
    shape_row = rows["shape top-1 ↑"]
    assert shape_row == ["40.50 ± 0.71", "44.00 ± 1.41", "+3.50"]
    # counts and settings are not metrics
    assert not any(k.endswith(("/n", "/C", "n_images", "seconds")) for k in metrics)
    # training values come from the last line of metrics.jsonl
    assert metrics["train/loss_clip"]["settings"]["clip"]["values"] == [pytest.approx(4 / 30), pytest.approx(4 / 30 + 0.01)]

    html = index.read_text()
    assert "training_curves.png" in html and "metrics_bar.png" in html and "shape top-1" in html
    assert 'href="../runs/clip-ping-seed0/banks/neighbors.html"' in html
    assert "Δ clip-ping - clip" in (out / "report.md").read_text()


def test_report_single_seeds_names_and_errors(tmp_path):
    a = _write_run(tmp_path / "a", "clip-ping", 0, 0.0)
    b = _write_run(tmp_path / "b", "clip-ping", 0, 2.0)  # same config: only names can tell them apart
    out = tmp_path / "report"
    result = report_from_config(ReportConfig(runs=[str(a), str(b)], out=str(out), names=["baseline", "tuned"]))
    assert Path(result["report"]).is_file()
    results = json.loads((out / "results.json").read_text())
    top1 = results["metrics"]["zeroshot/shape/top1"]
    assert top1["settings"]["baseline"] == {"mean": 40.0, "std": None, "n": 1, "values": [40.0]}
    assert top1["delta"] == pytest.approx(2.0)
    rows = _table_cells((out / "report.md").read_text())
    assert rows["shape top-1 ↑"] == ["40.00", "42.00", "+2.00"]
    assert rows["text→image mean rank ↓"][2] == "-2.00"  # lower is better: the delta's sign is shown as is

    # without names, identical configs still give distinct, readable settings
    build_report([a, b], tmp_path / "report2")
    names = [s["name"] for s in json.loads((tmp_path / "report2" / "results.json").read_text())["settings"]]
    assert names == ["clip-ping (a)", "clip-ping (b)"]

    # a run without eval.json still gets training curves; a non-run folder is a one-line error
    c = tmp_path / "c"
    c.mkdir()
    (c / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "loss_clip": 2.0}) + "\nnot json\n")
    build_report([c], tmp_path / "report3")
    assert (tmp_path / "report3" / "training_curves.png").is_file()
    assert not (tmp_path / "report3" / "metrics_bar.png").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a run folder"):
        build_report([tmp_path / "empty"], tmp_path / "report4")
    with pytest.raises(DataError, match="not found"):
        build_report([tmp_path / "missing"], tmp_path / "report4")
    with pytest.raises(ConfigError, match="one per run"):
        build_report([a, b], tmp_path / "report4", names=["only-one"])


def test_value_format():
    assert format_value(12.3456, "zeroshot/shape/top1") == "12.35"
    assert format_value(0.123456, "train/loss_clip") == "0.1235"
    assert re.fullmatch(r"\d+\.\d\d", format_value(3.0, "retrieval/image_to_text/mean_rank"))


class _Refs(HTMLParser):
    """Every <img src> and <a href> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        elif tag == "a" and attrs.get("href") is not None:
            self.links.append(attrs["href"])


def _refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _assert_refs_resolve(page: Path) -> _Refs:
    """Every image and link of ``page`` is relative and names a file (or run folder) on disk; data: images decode."""
    refs = _refs(page)
    for ref in refs.images + refs.links:
        assert ref, f"empty reference in {page}"
        if ref.startswith("data:image/"):
            Image.open(io.BytesIO(base64.b64decode(ref.split(",", 1)[1]))).verify()
            continue
        parts = urllib.parse.urlsplit(ref)
        assert not parts.scheme and not parts.netloc and not ref.startswith("/"), f"{ref} is not a relative link"
        assert (page.parent / urllib.parse.unquote(parts.path)).exists(), f"{page.name} -> {ref}: not on disk"
    return refs


def test_demo_report_links_its_neighbour_page(tmp_path, tiny_banked):
    """The demo's last stage: the neighbour page beside the report, linked relatively, every reference on disk."""
    demo = tmp_path / "demo out"          # a space: links must be URL-quoted
    runs = [_write_run(demo / "runs" / "clip-seed0", "clip", 0, 0.0),
            _write_run(demo / "runs" / "clip-ping-seed0", "clip-ping", 0, 3.0)]
    page = write_demo_neighbor_page(tiny_banked, tiny_banked / "banks", demo / "report")
    index = build_report(runs, demo / "report")

    refs = _assert_refs_resolve(index)
    assert "neighbors.html" in refs.links
    assert sorted(refs.images) == ["metrics_bar.png", "training_curves.png"]
    assert {"../runs/clip-seed0", "../runs/clip-ping-seed0"} <= set(refs.links)
    assert "[neighbour page](neighbors.html)" in (demo / "report" / "report.md").read_text()
    neighbour_refs = _assert_refs_resolve(demo / "report" / "neighbors.html")
    assert page["shown"] == 48 and len(neighbour_refs.images) == 3 * 48  # sample, p and q per row, all embedded

    # the folder moves as a whole: every reference still resolves
    moved = tmp_path / "elsewhere" / "demo#2"
    moved.parent.mkdir()
    shutil.move(demo, moved)
    for name in ("index.html", "neighbors.html"):
        _assert_refs_resolve(moved / "report" / name)
    # and a missing target is caught (the check can fail)
    (moved / "report" / "metrics_bar.png").unlink()
    with pytest.raises(AssertionError, match="metrics_bar.png"):
        _assert_refs_resolve(moved / "report" / "index.html")


def test_old_and_new_clip_runs_are_one_setting_but_lambdas_still_split_clip_ping(tmp_path):
    """Plain CLIP runs recorded lambda 0.5 before the lambdas followed the method, 0 since; neither is read."""
    from clip_ping.report.runs import group_runs, load_run
    from clip_ping.training.train_config import comparable_options

    old = _write_run(tmp_path / "clip-old", "clip", 0, 0.0)
    new = _write_run(tmp_path / "clip-new", "clip", 1, 1.0)
    config = yaml.safe_load((new / "config.yaml").read_text())
    (new / "config.yaml").write_text(yaml.safe_dump({**config, "lambda_nn": 0.0, "lambda_xnn": 0.0}))
    ping_a = _write_run(tmp_path / "ping-a", "clip-ping", 0, 2.0)
    ping_b = _write_run(tmp_path / "ping-b", "clip-ping", 1, 3.0)
    config = yaml.safe_load((ping_b / "config.yaml").read_text())
    (ping_b / "config.yaml").write_text(yaml.safe_dump({**config, "lambda_nn": 1.0}))

    settings = group_runs([load_run(p) for p in (old, new, ping_a, ping_b)])
    assert [[r.path.name for r in s.runs] for s in settings] == [["clip-old", "clip-new"], ["ping-a"], ["ping-b"]]
    assert [s.name for s in settings] == ["clip", "clip-ping lambda_nn=0.5", "clip-ping lambda_nn=1.0"]
    assert comparable_options({"method": "slip", "lambda_nn": 0.5, "lr": 1}) == {"method": "slip", "lr": 1}
    assert comparable_options({"method": "unknown", "lambda_nn": 0.5}) == {"method": "unknown", "lambda_nn": 0.5}


def _fake_demo_stages(monkeypatch, train_summary=lambda cfg: {"step": 6, "stopped_by": None}):
    """The demo's stages recorded instead of run, in order (kind, config); its processes are threads."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import clip_ping.banks.extract
    import clip_ping.evaluation.stage
    import clip_ping.knn
    import clip_ping.training.trainer
    from clip_ping import demo as demo_mod

    events: list[tuple[str, object]] = []
    lock = threading.Lock()

    def record(kind, result=lambda cfg: None):
        def stage(cfg):
            with lock:
                events.append((kind, cfg))
            return result(cfg)
        return stage

    class RecordingPool(ThreadPoolExecutor):  # notes each run as it is handed out: (threads, fn, run config, ...)
        def submit(self, fn, *args, **kwargs):
            with lock:
                events.append(("handed out", args[2]) if len(args) >= 3 else ("process start", fn))
            return super().submit(fn, *args, **kwargs)

    def pool(max_workers, mp_context, initializer):  # threads cannot set signal handlers: the start is recorded
        assert initializer is demo_mod._start_process
        return RecordingPool(max_workers)

    monkeypatch.setattr(demo_mod, "ProcessPoolExecutor", pool)
    monkeypatch.setattr(demo_mod, "_in_worker", lambda threads, fn, *args: events.append(("threads", threads)) or fn(*args))
    monkeypatch.setattr(clip_ping.banks.extract, "extract_banks", record("extract"))
    monkeypatch.setattr(clip_ping.knn, "build_neighbors", record("neighbors"))
    monkeypatch.setattr(clip_ping.training.trainer, "train", record("train", train_summary))
    monkeypatch.setattr(clip_ping.evaluation.stage, "evaluate_from_config", record("eval"))
    monkeypatch.setattr(demo_mod, "write_demo_neighbor_page", lambda *a: None)
    monkeypatch.setattr("clip_ping.report.build.build_report", lambda runs, out: (out.mkdir(parents=True, exist_ok=True),
                                                                          (out / "report.md").write_text("table")))
    monkeypatch.setattr("clip_ping.data.synth.generate_synthetic", lambda c: None)
    return events


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_stopped_demo_run_is_not_evaluated_and_no_other_run_starts(monkeypatch, tmp_path, jobs):
    """Ctrl-C: the trainer saves and returns "stopped"; the demo must not evaluate that run (its eval.json would
    make the next demo skip it half-trained) nor start another run; it stops as interrupted."""
    import time

    from clip_ping import demo as demo_mod

    def summary(cfg):
        if (cfg.method, cfg.seed) == ("clip-ping", 0):  # the first run handed out
            return {"step": 3, "stopped_by": "SIGINT"}
        time.sleep(0.3)  # the other run in progress side by side ends later
        return {"step": 186, "stopped_by": None}

    events = _fake_demo_stages(monkeypatch, summary)
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGINT at step 3"):
        demo_mod.run_demo(demo_mod.DemoConfig(out=str(tmp_path), progress=False, jobs=jobs))
    trained = [(c.method, c.seed) for kind, c in events if kind == "train"]
    evaluated = [Path(c.checkpoint).name for kind, c in events if kind == "eval"]
    assert trained == [("clip-ping", 0)] if jobs == 1 else sorted(trained) == [("clip-ping", 0), ("clip-ping", 1)]
    assert "clip-ping-seed0" not in evaluated and not (tmp_path / "timings.json").exists()


def test_demo_extracts_with_every_core_then_trains_side_by_side_on_a_cpu(monkeypatch, tmp_path):
    """Unset --jobs is 2 on a CPU with 2+ cores, 1 with a GPU. The teachers extract first, in the demo's own
    process with its loader workers and at the demo's teacher size; then the four runs train two at a time, each
    process with one thread and no loader worker (a worker would preempt the training thread); stage times add up."""

    import torch

    from clip_ping import demo as demo_mod
    from clip_ping.errors import ConfigError

    monkeypatch.setattr(demo_mod.os, "cpu_count", lambda: 2)
    assert demo_mod.demo_jobs(None, "cpu") == 2
    assert demo_mod.demo_jobs(1, "cpu") == 1
    with monkeypatch.context() as one_core:
        one_core.setattr(demo_mod.os, "cpu_count", lambda: 1)
        assert demo_mod.demo_jobs(None, "cpu") == 1
    with monkeypatch.context() as gpu:
        gpu.setattr("clip_ping.distributed.resolve_device", lambda name: torch.device("cuda", 0))
        assert demo_mod.demo_jobs(None, "auto") == 1
    with pytest.raises(ConfigError, match="jobs"):
        demo_mod.DemoConfig(jobs=0)
    with pytest.raises(ConfigError, match="teacher_image_size"):
        demo_mod.DemoConfig(teacher_image_size=8)

    events = _fake_demo_stages(monkeypatch)
    demo_mod.run_demo(demo_mod.DemoConfig(out=str(tmp_path), progress=True))

    kinds = [kind for kind, _ in events]
    # the two processes start first (they import the run code while the teachers load), then the teachers
    # extract, before any run and not inside a side-by-side process
    assert kinds[:4] == ["process start", "process start", "extract", "neighbors"]
    extract = next(cfg for kind, cfg in events if kind == "extract")
    assert extract.teacher_image_size == 96 and extract.workers == demo_mod.DemoConfig.workers and extract.progress
    trains = [cfg for kind, cfg in events if kind == "train"]
    assert sorted((c.method, c.seed) for c in trains) == [("clip", 0), ("clip", 1), ("clip-ping", 0), ("clip-ping", 1)]
    # the longer CLIP-PING runs are handed out first, so the two processes end at about the same time
    handed_out = [(c.method, c.seed) for kind, c in events if kind == "handed out"]
    assert handed_out == [("clip-ping", 0), ("clip-ping", 1), ("clip", 0), ("clip", 1)]
    evals = [cfg for kind, cfg in events if kind == "eval"]
    assert {c.workers for c in trains} == {0} and {c.workers for c in evals} == {0}
    # every run is evaluated in fp32, whatever it trained in (bf16 moves retrieval by more than the seeds do)
    assert {c.precision for c in evals} == {"fp32"}
    assert not any(c.progress for c in trains + evals)  # bars of side-by-side processes would overwrite each other
    assert [cfg for kind, cfg in events if kind == "threads"] == [1] * 4
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert {k for k in timings if k.startswith(("train", "eval"))} == {"train clip", "eval clip", "train clip-ping",
                                                                        "eval clip-ping"}  # merged from the processes




def test_a_side_by_side_process_imports_the_run_code_and_leaves_ctrl_c_to_the_demo_until_a_run_starts():
    import signal
    import subprocess
    import sys

    from clip_ping import demo as demo_mod

    # in a fresh process, as the pool starts one: the run code imported, Ctrl-C ignored while it waits
    check = ("import signal, sys; from clip_ping import demo; "
             "assert 'clip_ping.evaluation.stage' not in sys.modules; demo._start_process(); "
             "print('clip_ping.evaluation.stage' in sys.modules, 'sklearn.linear_model' in sys.modules, "
             "signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True", "True"]
    before = signal.getsignal(signal.SIGINT)
    try:
        demo_mod._start_process()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # waiting: the demo stops the pool
        during = []
        demo_mod._in_worker(1, lambda: during.append(signal.getsignal(signal.SIGINT)) or {})
        assert during == [signal.default_int_handler]  # a run stops on Ctrl-C as in one process
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
