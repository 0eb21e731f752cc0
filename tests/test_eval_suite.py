"""`clip-ping eval --suite`: tiny instances of every layout the field reports on, built on disk here."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from clip_ping.cli import main
from clip_ping.data.images import load_image
from clip_ping.errors import ClipPingError
from clip_ping.evaluation.layouts import read_class_folders, read_karpathy_json, read_wds, resolve_templates
from clip_ping.evaluation.retrieval import caption_ids, retrieval_metrics, retrieval_metrics_per_row
from clip_ping.evaluation.suite import run_suite
from clip_ping.evaluation.suite_file import read_suite

COLORS = [(200, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]
NAMES = ["red", "green", "blue", "yellow"]


def _png(color, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.full((32, 32, 3), 255, dtype=np.uint8)
    pixels[8:24, 8:24] = color
    pixels = np.clip(pixels.astype(int) + rng.integers(-12, 12, pixels.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _class_folders(root: Path, per_class: int, folders=("a_red", "b_green", "c_blue", "d_yellow"), seed=0) -> Path:
    for c, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            (root / folder / f"{i}.png").write_bytes(_png(COLORS[c % 4], seed * 100 + c * 10 + i))
    return root


def _wds(root: Path, split: str, samples: list[tuple[bytes, str, str]], n_shards: int = 2) -> Path:
    """clip_benchmark's layout: ROOT/SPLIT/{0..n-1}.tar + nshards.txt; samples are (image, ext, payload)."""
    (root / split).mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(root / split / f"{s}.tar", "w") as tar:
            for i in range(s, len(samples), n_shards):
                image, ext, payload = samples[i]
                for name, data in ((f"s{i:05d}.png", image),
                                   (f"s{i:05d}.{ext}", payload.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / split / "nshards.txt").write_text(str(n_shards))
    return root


def _suite(tmp_path: Path, tasks: list[dict]) -> Path:
    import yaml

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks}))
    return path


def _encode(model, preprocess, paths):
    with torch.no_grad():
        return model.encode_image(torch.stack([preprocess(load_image(p)) for p in paths]))


def test_openai_and_simple_templates_are_open_clips():
    assert resolve_templates("openai") == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(resolve_templates("openai")) == 80 and len(resolve_templates("simple")) == len(SIMPLE_IMAGENET_TEMPLATES)


def test_imagenet_folders_with_open_clip_names_empty_classes_counted(tiny_model, tmp_path):
    model, tokenizer, preprocess = tiny_model
    root = tmp_path / "imagenet"
    synsets = [f"n{i:08d}" for i in range(1000)]
    for s in synsets:
        (root / "val" / s).mkdir(parents=True)
    picked = {3: COLORS[0], 500: COLORS[1], 999: COLORS[2]}  # three classes hold images
    for c, color in picked.items():
        for i in range(2):
            (root / "val" / synsets[c] / f"{i}.png").write_bytes(_png(color, c + i))
    tasks = read_suite(_suite(tmp_path, [{"name": "imagenet", "kind": "zeroshot", "layout": "folders",
                                          "path": "imagenet", "split": "val", "classnames": "imagenet",
                                          "templates": "simple"}]))
    result = run_suite(model, tokenizer, preprocess, tasks, workers=0, progress=False)
    scores = result["tasks"]["imagenet"]
    assert (scores["n"], scores["n_classes"], scores["n_templates"]) == (6, 1000, len(SIMPLE_IMAGENET_TEMPLATES))
    assert scores["skipped"] == {"classes_without_images": 997}

    # the reference: open_clip's own zero-shot classifier over all 1000 names
    files = [root / "val" / synsets[c] / f"{i}.png" for c in sorted(picked) for i in range(2)]
    labels = torch.tensor([c for c in sorted(picked) for _ in range(2)])
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, IMAGENET_CLASSNAMES,
                                                          SIMPLE_IMAGENET_TEMPLATES, num_classes_per_batch=250)
    logits = torch.nn.functional.normalize(_encode(model, preprocess, files), dim=-1) @ classifier
    for k in (1, 5):
        expected = 100 * (logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()
        assert scores[f"top{k}"] == pytest.approx(expected)
    assert [row["metric"] for row in result["table"]] == ["top-1 %", "top-5 %", "mean per-class %"]


def test_a_folder_set_with_its_own_names_and_templates(tiny_model, tmp_path):
    root = _class_folders(tmp_path / "colors" / "test", per_class=2)
    (root / "e_empty").mkdir()
    (tmp_path / "colors" / "classnames.txt").write_text("crimson\ngrass\nsky\nlemon\nnothing\n")
    (tmp_path / "colors" / "zeroshot_classification_templates.txt").write_text("a {} square.\na photo of {}.\n")
    data = read_class_folders(tmp_path / "colors", "test")
    assert data.classnames == ["crimson", "grass", "sky", "lemon", "nothing"]
    assert data.templates == ["a {} square.", "a photo of {}."]
    assert data.skipped == {"classes_without_images": 1} and data.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # names for the wrong number of folders: one line naming both
    (tmp_path / "colors" / "classnames.txt").write_text("crimson\ngrass\n")
    with pytest.raises(ClipPingError, match="list 2 classes but .* has 5 class folders"):
        read_class_folders(tmp_path / "colors", "test")


def _karpathy(tmp_path: Path) -> Path:
    images = tmp_path / "flickr" / "flickr30k-images"
    images.mkdir(parents=True)
    entries = []
    for i, color in enumerate(COLORS):
        if i != 2:  # image 2 is listed but missing on disk
            (images / f"{i}.jpg").write_bytes(_png(color, i))
        sentences = [{"raw": f"a {NAMES[i]} square number {j}.", "tokens": []} for j in range(5)]
        entries.append({"filename": f"{i}.jpg", "split": "test", "sentences": sentences})
    entries.append({"filename": "0.jpg", "split": "train", "sentences": [{"raw": "not in test"}]})
    (tmp_path / "flickr" / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    return tmp_path / "flickr" / "dataset_flickr30k.json"


def test_karpathy_json_retrieval_five_captions_missing_image_counted(tiny_model, tmp_path):
    model, tokenizer, preprocess = tiny_model
    path = _karpathy(tmp_path)
    data = read_karpathy_json(path, path.parent / "flickr30k-images")
    assert data.skipped == {"missing_image": 1} and len(data.captions) == 15
    assert data.text_to_image == [0] * 5 + [1] * 5 + [2] * 5

    tasks = read_suite(_suite(tmp_path, [{"name": "flickr", "kind": "retrieval", "layout": "karpathy",
                                          "path": "flickr/dataset_flickr30k.json",
                                          "images": "flickr/flickr30k-images"}]))
    result = run_suite(model, tokenizer, preprocess, tasks, workers=0, progress=False)["tasks"]["flickr"]
    assert (result["n_images"], result["n_texts"]) == (3, 15)
    images = _encode(model, preprocess, data.images.filepaths)
    with torch.no_grad():
        texts = model.encode_text(tokenizer(data.captions))
    t2i = torch.tensor(data.text_to_image)
    assert result["retrieval"] == retrieval_metrics(images, texts, t2i, text_ids=caption_ids(data.captions))
    per_row = retrieval_metrics_per_row(images, texts, t2i)
    for direction in ("image_to_text", "text_to_image"):
        assert result["retrieval_per_row"][direction] == pytest.approx(per_row[direction])


def test_clip_benchmark_wds_classification_and_retrieval(tiny_model, tmp_path):
    model, tokenizer, preprocess = tiny_model
    cls_root = tmp_path / "wds_colors"
    samples = [(_png(COLORS[i % 4], i), "cls", str(i % 4)) for i in range(10)]
    _wds(cls_root, "test", samples)
    (cls_root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (cls_root / "zeroshot_classification_templates.txt").write_text("a {c} square.\n")  # clip_benchmark's {c}
    data = read_wds(cls_root, "test")
    assert sorted(data.labels.tolist()) == sorted(i % 4 for i in range(10))
    assert data.classnames == NAMES and data.templates == ["a {} square."]

    ret_root = tmp_path / "wds_captions"
    _wds(ret_root, "test", [(_png(COLORS[i], i), "txt", f"a {NAMES[i]} square.\na {NAMES[i]} thing.") for i in range(4)])
    (ret_root / "dataset_type.txt").write_text("retrieval\n")
    retrieval = read_wds(ret_root, "test")
    assert len(retrieval.captions) == 8 and sorted(retrieval.text_to_image) == [0, 0, 1, 1, 2, 2, 3, 3]

    tasks = read_suite(_suite(tmp_path, [{"name": "colors", "kind": "zeroshot", "layout": "wds", "path": "wds_colors"},
                                         {"name": "captions", "kind": "retrieval", "layout": "wds",
                                          "path": "wds_captions"}]))
    result = run_suite(model, tokenizer, preprocess, tasks, workers=0, progress=False)
    assert result["tasks"]["colors"]["n"] == 10 and result["tasks"]["captions"]["n_texts"] == 8
    # the images read from the tars are the ones written
    images = [data.images.open_image(i) for i in range(len(data.images))]
    assert all(im.size == (32, 32) for im in images)
    with torch.no_grad():
        feats = model.encode_image(torch.stack([preprocess(im) for im in images]))
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, NAMES, ["a {} square."])
    top1 = 100 * ((feats @ classifier).argmax(1) == torch.from_numpy(data.labels)).float().mean().item()
    assert result["tasks"]["colors"]["top1"] == pytest.approx(top1)
    assert {row["task"] for row in result["table"]} == {"colors", "captions"}


def test_linear_probes_on_class_folders_and_wds(tiny_model, tmp_path):
    model, tokenizer, preprocess = tiny_model
    for seed, (split, n) in enumerate((("train", 6), ("val", 2), ("test", 3))):
        _class_folders(tmp_path / "folders" / split, n, seed=seed)
    wds_root = tmp_path / "wds"
    for split, n in (("train", 16), ("test", 8)):
        _wds(wds_root, split, [(_png(COLORS[i % 4], i + n), "cls", str(i % 4)) for i in range(n)])
    (wds_root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    tasks = read_suite(_suite(tmp_path, [
        {"name": "folders-probe", "kind": "linear_probe", "layout": "folders", "path": "folders"},
        {"name": "wds-probe", "kind": "linear_probe", "layout": "wds", "path": "wds"}]))
    result = run_suite(model, tokenizer, preprocess, tasks, workers=0, progress=False, probe_cs=[1.0, 100.0])
    folders, wds = result["tasks"]["folders-probe"], result["tasks"]["wds-probe"]
    assert (folders["n_train"], folders["n_val"], folders["n_test"], folders["n_classes"]) == (24, 8, 12, 4)
    assert (wds["n_train"] + wds["n_val"], wds["n_test"]) == (16, 8)  # no val split: 20% of train held out
    assert 0 <= folders["accuracy"] <= 100 and [r["metric"] for r in result["table"]] == ["accuracy %"] * 2


@pytest.mark.parametrize("task,expected", [
    ({"kind": "zeroshot", "layout": "wds", "path": "empty"}, "expected .*empty/classnames.txt"),
    ({"kind": "retrieval", "layout": "karpathy", "path": "empty"}, "expected a Karpathy-split captions JSON file"),
    ({"kind": "zeroshot", "layout": "folders", "path": "empty"}, r"expected class folders \(.*empty/<class>/<image>\)"),
])
def test_a_task_on_the_wrong_layout_fails_in_one_line_naming_the_expected_file(tmp_path, monkeypatch, capsys,
                                                                               tiny_model, task, expected):
    import clip_ping.model.student

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("not a data set")
    monkeypatch.setattr(clip_ping.model.student, "load_student", lambda path: tiny_model)
    suite = _suite(tmp_path, [{"name": "t", **task}])
    assert main(["eval", "--suite", str(suite), "--checkpoint", "unused", "--out", str(tmp_path / "o.json"),
                 "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    import re

    assert re.search(expected, err), err


def test_suite_file_mistakes_are_named(tmp_path):
    with pytest.raises(ClipPingError, match="unknown key 'templatse'"):
        read_suite(_suite(tmp_path, [{"kind": "zeroshot", "layout": "wds", "path": "x", "templatse": "openai"}]))
    with pytest.raises(ClipPingError, match="kind 'retrieval' is not one of zeroshot, linear_probe for layout 'folders'"):
        read_suite(_suite(tmp_path, [{"kind": "retrieval", "layout": "folders", "path": "x"}]))
    with pytest.raises(ClipPingError, match="key 'path' is required"):
        read_suite(_suite(tmp_path, [{"kind": "zeroshot", "layout": "wds"}]))


def test_cli_suite_writes_one_table(tiny_model, tmp_path, monkeypatch, tiny_synth):
    import clip_ping.model.student

    monkeypatch.setattr(clip_ping.model.student, "load_student", lambda path: tiny_model)
    _class_folders(tmp_path / "colors" / "test", per_class=2)
    suite = _suite(tmp_path, [{"name": "colors", "kind": "zeroshot", "layout": "folders", "path": "colors"},
                              {"name": "flickr", "kind": "retrieval", "layout": "karpathy",
                               "path": str(_karpathy(tmp_path)), "images": "flickr/flickr30k-images"},
                              {"name": "synth", "kind": "retrieval", "layout": "data", "path": str(tiny_synth)}])
    out = tmp_path / "suite.json"
    assert main(["eval", "--suite", str(suite), "--checkpoint", "unused", "--out", str(out), "--workers", "0",
                 "--no-progress"]) == 0
    result = json.loads(out.read_text())
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0] == "| task | kind | metric | value | n |"
    assert len(table) == 2 + len(result["table"]) and {r["task"] for r in result["table"]} == {"colors", "flickr", "synth"}
    assert result["tasks"]["synth"]["n_texts"] == 16
