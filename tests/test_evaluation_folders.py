"""`clip-ping eval` on an image folder (one sub-folder per class): zero-shot from folder names, no retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_ping.data.dataset_info import DEFAULT_TEMPLATES
from clip_ping.data.images import load_image
from clip_ping.data.table import folder_layout as image_folder_layout
from clip_ping.errors import DataError
from clip_ping.evaluation.runner import evaluate
from clip_ping.evaluation.stage import EvalConfig, evaluate_from_config

# Folder names as a user would have them; class names are the readable forms.
COLORS = {"dark_red": (150, 20, 20), "Green": (30, 200, 40), "blue-ish": (30, 40, 220),
          "yellow": (230, 220, 30), "cyan": (30, 220, 220), "magenta": (220, 30, 220)}
READABLE = ["dark red", "green", "blue ish", "yellow", "cyan", "magenta"]


def _write_folder(root: Path, per_class: int = 3, seed: int = 0) -> Path:
    """ROOT/<class>/<i>.png: a coloured square on white, with a little noise."""
    rng = np.random.default_rng(seed)
    for folder, color in COLORS.items():
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((32, 32, 3), 255, dtype=np.uint8)
            pixels[8:24, 8:24] = color
            pixels = np.clip(pixels.astype(int) + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{i}.png")
    (root / "empty").mkdir()  # an empty folder is not a class
    return root


def test_layout_detection(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "test.csv").write_text("filepath,caption\n")
    assert image_folder_layout(tmp_path / "tables") is None
    assert image_folder_layout(_write_folder(tmp_path / "classes")) == "classes"
    _write_folder(tmp_path / "splits" / "test")
    assert image_folder_layout(tmp_path / "splits") == "splits"


def test_evaluate_image_folder_zero_shot_from_folder_names(tiny_model, tmp_path):
    model, tokenizer, preprocess = tiny_model
    root = _write_folder(tmp_path / "folder")
    result = evaluate(model, tokenizer, preprocess, root, batch_size=4, workers=0, linear_probe=True, progress=False)
    json.dumps(result)

    assert (result["n_images"], result["n_texts"]) == (18, 0)
    assert set(result["zeroshot"]) == {"class"}
    scores = result["zeroshot"]["class"]
    assert set(scores) >= {"top1", "top5", "mean_per_class", "per_class", "n"}  # 6 classes: top-5 is meaningful
    # classes in folder order, named readably ("dark_red" -> "dark red")
    assert list(scores["per_class"]) == [READABLE[list(COLORS).index(f)] for f in sorted(COLORS)]
    assert scores["n"] == 18
    # no captions: retrieval is skipped, and so is the probe (no train/ and val/ folders), with the reasons
    assert "retrieval" not in result and "captions" in result["skipped"]["retrieval"]
    assert "linear_probe" not in result and "train/" in result["skipped"]["linear_probe"]

    # the numbers are the ones open_clip's own helpers give on the same images
    folders = sorted(COLORS)
    names = [READABLE[list(COLORS).index(f)] for f in folders]
    files = [(i, p) for i, f in enumerate(folders) for p in sorted((root / f).glob("*.png"))]
    with torch.no_grad():
        feats = model.encode_image(torch.stack([preprocess(load_image(p)) for _, p in files]))
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, names, DEFAULT_TEMPLATES)
    labels = torch.tensor([i for i, _ in files])
    logits = feats @ classifier
    assert scores["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert scores["top5"] == pytest.approx(100 * top5)


def test_eval_config_on_split_folders_with_names_and_templates_files(tiny_model, tmp_path, monkeypatch):
    import clip_ping.model.student

    model, tokenizer, preprocess = tiny_model
    data = tmp_path / "data"
    for seed, split in enumerate(("train", "val", "test")):
        _write_folder(data / split, per_class=4 if split == "train" else 2, seed=seed)
    (tmp_path / "names.json").write_text(json.dumps({"dark_red": "crimson", "blue-ish": "navy"}))
    (tmp_path / "templates.txt").write_text("a {} square.\n")
    monkeypatch.setattr(clip_ping.model.student, "load_student", lambda path: (model, tokenizer, preprocess))
    out = tmp_path / "eval.json"
    cfg = EvalConfig(checkpoint="unused", data=str(data), out=str(out), workers=0, progress=False,
                     names_file=str(tmp_path / "names.json"), templates_file=str(tmp_path / "templates.txt"),
                     probe_cs=[1.0, 100.0])
    result = evaluate_from_config(cfg)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))

    scores = result["zeroshot"]["class"]
    assert set(scores["per_class"]) == {"crimson", "green", "navy", "yellow", "cyan", "magenta"}
    assert result["n_images"] == 12 and set(result["skipped"]) == {"retrieval"}
    probe = result["linear_probe"]["class"]  # train/ and val/ folders: the probe runs
    assert (probe["n_train"], probe["n_val"], probe["n_test"], probe["n_classes"]) == (24, 12, 12, 6)

    # the template file is what the classifier was built from
    with torch.no_grad():
        files = [(i, p) for i, f in enumerate(sorted(COLORS)) for p in sorted((data / "test" / f).glob("*.png"))]
        feats = model.encode_image(torch.stack([preprocess(load_image(p)) for _, p in files]))
        names = [{"dark_red": "crimson", "blue-ish": "navy"}.get(f, READABLE[list(COLORS).index(f)])
                 for f in sorted(COLORS)]
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, names, ["a {} square."])
    labels = torch.tensor([i for i, _ in files])
    assert scores["top1"] == pytest.approx(100 * ((feats @ classifier).argmax(1) == labels).float().mean().item())


def test_a_folder_with_neither_tables_nor_class_folders_is_refused(tiny_model, tmp_path):
    model, tokenizer, preprocess = tiny_model
    (tmp_path / "data" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"matches no layout for split 'test' \(test\.csv/test\.tsv: none; test\.shards\.json: none; "
                       r"<class>/ image folders: .*needs at least 2 class folders"):
        evaluate(model, tokenizer, preprocess, tmp_path / "data", workers=0, progress=False)
