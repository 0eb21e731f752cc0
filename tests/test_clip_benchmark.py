"""clip-ping's evaluation numbers against clip_benchmark's, on the same exported model and data.

They agree to 0.01 points where the definitions are the same, and the places
where they differ by definition (clip_ping/evaluation/clip_benchmark_run.py) are shown.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from test_eval_suite import COLORS, NAMES, _class_folders, _png, _suite, _wds

from clip_ping.evaluation import clip_benchmark_run as cb
from clip_ping.evaluation.layouts import read_class_folders, read_karpathy_json
from clip_ping.evaluation.suite import run_suite
from clip_ping.evaluation.suite_file import read_suite
from clip_ping.hub.export import ExportConfig, export_open_clip

pytest.importorskip("clip_benchmark")

AGREE = 0.01  # points


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    """The tiny model written as a clip-ping checkpoint."""
    from conftest import TINY_MODEL

    folder = tmp_path_factory.mktemp("checkpoint")
    torch.save({"model": tiny_model[0].state_dict(), "model_name": TINY_MODEL}, folder / "latest.pt")
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint):
    """The checkpoint exported, and loaded back by open_clip."""
    folder = checkpoint
    export_open_clip(ExportConfig(checkpoint=str(folder / "latest.pt"), out=str(folder / "export")))
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder / 'export'}")
    loaded.eval()
    return loaded, open_clip.get_tokenizer(f"local-dir:{folder / 'export'}"), preprocess


def _ours(exported, tmp_path, tasks):
    model, tokenizer, preprocess = exported
    return run_suite(model, tokenizer, preprocess, read_suite(_suite(tmp_path, tasks)), workers=0,
                     progress=False)["tasks"]


def _karpathy_json(root: Path, captions: list[list[str]]) -> Path:
    (root / "images").mkdir(parents=True)
    entries = []
    for i, texts in enumerate(captions):
        (root / "images" / f"{i}.png").write_bytes(_png(COLORS[i % 4], 50 + i))
        entries.append({"filepath": "images", "filename": f"{i}.png", "split": "test",  # MSCOCO style
                        "sentences": [{"raw": t} for t in texts]})
    (root / "captions.json").write_text(json.dumps({"images": entries}))
    return root / "captions.json"


def test_zero_shot_on_class_folders_and_wds_equals_clip_benchmark(exported, tmp_path):
    model, tokenizer, preprocess = exported
    six = ("a_red", "b_green", "c_blue", "d_yellow", "e_red2", "f_green2")
    _class_folders(tmp_path / "folders" / "test", per_class=3, folders=six)
    (tmp_path / "templates.txt").write_text("a {} square.\na photo of a {}.\n")
    wds_root = tmp_path / "wds"
    _wds(wds_root, "test", [(_png(COLORS[i % 4], i), "cls", str(i % 6)) for i in range(18)])
    (wds_root / "classnames.txt").write_text("\n".join(NAMES + ["crimson", "lime"]) + "\n")
    (wds_root / "zeroshot_classification_templates.txt").write_text("a {c} square.\nitap of a {c}.\n")
    ours = _ours(exported, tmp_path, [
        {"name": "folders", "kind": "zeroshot", "layout": "folders", "path": "folders", "templates": "templates.txt"},
        {"name": "wds", "kind": "zeroshot", "layout": "wds", "path": "wds"}])

    theirs_folders = cb.zeroshot(model, tokenizer, preprocess,
                                 read_class_folders(tmp_path / "folders", "test", templates=str(tmp_path / "templates.txt")))
    theirs_wds = cb.zeroshot(model, tokenizer, preprocess, None, wds_root=str(wds_root))  # clip_benchmark reads the shards
    for mine, theirs in ((ours["folders"], theirs_folders), (ours["wds"], theirs_wds)):
        for key in ("top1", "top5", "mean_per_class"):
            assert mine[key] == pytest.approx(theirs[key], abs=AGREE), key


def test_retrieval_per_row_equals_clip_benchmark_and_the_headline_too_when_captions_differ(exported, tmp_path):
    model, tokenizer, preprocess = exported
    # 12 images: clip_benchmark's recall@k needs k <= the number of images
    captions = [[f"a {NAMES[i % 4]} square, photo {i}, caption {j}." for j in range(5)] for i in range(12)]
    path = _karpathy_json(tmp_path / "flickr", captions)
    ret_root = tmp_path / "wds_ret"
    _wds(ret_root, "test", [(_png(COLORS[i % 4], i), "txt", f"a {NAMES[i % 4]} thing {i}.\nsquare {i}.")
                            for i in range(12)])
    (ret_root / "dataset_type.txt").write_text("retrieval\n")
    ours = _ours(exported, tmp_path, [
        {"name": "flickr", "kind": "retrieval", "layout": "karpathy", "path": str(path)},
        {"name": "wds", "kind": "retrieval", "layout": "wds", "path": "wds_ret"}])

    theirs = {"flickr": cb.retrieval(model, tokenizer, preprocess, read_karpathy_json(path)),
              "wds": cb.retrieval(model, tokenizer, preprocess, None, wds_root=str(ret_root))}
    for name in ("flickr", "wds"):
        for direction in ("image_to_text", "text_to_image"):
            for k in ("R@1", "R@5", "R@10"):
                value = theirs[name][direction][k]
                assert ours[name]["retrieval_per_row"][direction][k] == pytest.approx(value, abs=AGREE)
                # distinct captions, no tied scores: the project's headline figure is the same number
                assert ours[name]["retrieval"][direction][k] == pytest.approx(value, abs=AGREE)


def test_identical_caption_texts_differ_by_definition(exported, tmp_path):
    """A caption shared by every image: clip-ping's headline counts it as one text that any of its images
    answers; clip_benchmark (and clip-ping's per-row figure) count each row, and tied rows can only hit once."""
    model, tokenizer, preprocess = exported
    captions = [[f"a {NAMES[i % 4]} square number {i}.", "a square."] for i in range(6)]
    path = _karpathy_json(tmp_path / "dup", captions)
    ours = _ours(exported, tmp_path, [{"name": "dup", "kind": "retrieval", "layout": "karpathy", "path": str(path)}])
    theirs = cb.retrieval(model, tokenizer, preprocess, read_karpathy_json(path))
    mine = ours["dup"]
    assert (mine["n_texts"], mine["retrieval"]["n_distinct_texts"]) == (12, 7)
    # "a square." names every image, so it is one hit in either count: u + 1 hits, where u is the hits
    # of the 6 distinct captions. Headline: (u + 1) of 7 texts; per row: the 6 tied rows share one top-1
    # image, so again u + 1 hits, but of 12 rows.
    hits = mine["retrieval"]["text_to_image"]["R@1"] * 7 / 100
    assert hits == pytest.approx(round(hits)) and hits >= 1
    assert theirs["text_to_image"]["R@1"] == pytest.approx(100 * hits / 12, abs=AGREE)
    for direction in ("image_to_text", "text_to_image"):
        assert mine["retrieval_per_row"][direction]["R@1"] == pytest.approx(theirs[direction]["R@1"], abs=AGREE)


def test_top5_with_exactly_five_classes_differs_by_definition(exported, tmp_path):
    model, tokenizer, preprocess = exported
    _class_folders(tmp_path / "five" / "test", per_class=2, folders=("a", "b", "c", "d", "e"))
    data = read_class_folders(tmp_path / "five", "test")
    theirs = cb.zeroshot(model, tokenizer, preprocess, data)
    ours = _ours(exported, tmp_path, [{"name": "five", "kind": "zeroshot", "layout": "folders", "path": "five"}])["five"]
    assert theirs["top5"] == 100.0  # five guesses among five classes: always right
    assert "top5" not in ours  # clip-ping leaves out a top-k that cannot miss
    assert ours["top1"] == pytest.approx(theirs["top1"], abs=AGREE)


def test_cli_with_clip_benchmark_puts_both_figures_in_one_table(checkpoint, tmp_path):
    from clip_ping.cli import main

    _class_folders(tmp_path / "colors" / "test", per_class=2, folders=("a", "b", "c", "d", "e", "f"))
    path = _karpathy_json(tmp_path / "flickr", [[f"photo {i} caption {j}" for j in range(5)] for i in range(10)])
    suite = _suite(tmp_path, [{"name": "colors", "kind": "zeroshot", "layout": "folders", "path": "colors"},
                              {"name": "flickr", "kind": "retrieval", "layout": "karpathy", "path": str(path)}])
    out = tmp_path / "results" / "suite.json"
    assert main(["eval", "--suite", str(suite), "--with-clip-benchmark", "--checkpoint", str(checkpoint / "latest.pt"),
                 "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    assert (out.parent / "suite-export" / "open_clip_config.json").is_file()  # scored: the exported model
    rows = {(r["task"], r["metric"]): r["value"] for r in json.loads(out.read_text())["table"]}
    for metric in ("top-1 %", "top-5 %", "mean per-class %"):
        assert rows[("colors", metric + " (clip_benchmark)")] == pytest.approx(rows[("colors", metric)], abs=AGREE)
    for metric in ("image->text R@1", "text->image R@5", "image->text R@10"):
        assert rows[("flickr", metric + " (clip_benchmark)")] == pytest.approx(rows[("flickr", metric + " (per row)")],
                                                                               abs=AGREE)
    assert "(clip_benchmark)" in out.with_suffix(".md").read_text()


def test_with_clip_benchmark_needs_a_suite(capsys):
    from clip_ping.cli import main

    assert main(["eval", "--with-clip-benchmark"]) == 2
    assert "needs 'suite'" in capsys.readouterr().err
