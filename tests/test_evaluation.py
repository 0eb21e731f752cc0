"""Evaluation metrics agree with open_clip's helpers; the runner scores a tiny model on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG, TINY_MODEL
from open_clip_train.train import get_clip_metrics
from PIL import Image

from clip_ping.errors import ConfigError
from clip_ping.evaluation import linear_probe, retrieval_metrics, zero_shot_accuracy, zero_shot_classifier
from clip_ping.evaluation.runner import evaluate
from clip_ping.evaluation.stage import EvalConfig, default_output_path, evaluate_from_config
from clip_ping.evaluation.tasks import read_tasks_file, read_templates_file

# ----------------------------------------------------------------------------- helpers


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _paired(n: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features where text i is a noisy copy of image i (so recall is neither 0 nor 1)."""
    images = _unit(n, d, seed=seed)
    texts = F.normalize(images + noise * _unit(n, d, seed=seed + 1), dim=-1)
    return images, texts


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHAPES = ["square", "bar"]


def _write_dataset(root: Path, n_train: int = 24, n_val: int = 9, n_test: int = 12) -> Path:
    """A labelled data set on disk: coloured squares / bars; every test image has two captions."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        lines = ["filepath,caption,color,shape"]
        for i in range(n):
            color, shape = list(COLORS)[i % 3], SHAPES[(i // 3) % 2]
            pixels = np.full((32, 32, 3), 255, dtype=np.uint8)
            if shape == "square":
                pixels[8:24, 8:24] = COLORS[color]
            else:
                pixels[4:28, 13:19] = COLORS[color]
            pixels = np.clip(pixels.astype(int) + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
            rel = f"images/{split}_{i}.png"
            Image.fromarray(pixels).save(root / rel)
            lines.append(f"{rel},a {color} {shape},{color},{shape}")
            if split == "test":
                lines.append(f"{rel},a {shape} in {color},{color},{shape}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    info = {
        "name": "tiny",
        "tasks": {
            "color": {"column": "color", "classes": list(COLORS), "templates": ["a {} thing.", "something {}."]},
            "shape": {"column": "shape", "classes": SHAPES, "templates": ["a {}."]},
        },
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


# ----------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("n", [40, 41])  # even and odd counts: the median rank is defined the same way
@pytest.mark.parametrize("logit_scale", [1.0, 100.0])
def test_retrieval_equals_open_clip_get_clip_metrics(n, logit_scale):
    images, texts = _paired(n, 16, noise=1.2, seed=n)
    ours = retrieval_metrics(images, texts)
    theirs = get_clip_metrics(images, texts, torch.tensor(logit_scale))
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            # open_clip reports recall as a fraction, clip-ping in %
            assert ours[direction][f"R@{k}"] == pytest.approx(100 * theirs[f"{direction}_R@{k}"])
        assert ours[direction]["mean_rank"] == pytest.approx(theirs[f"{direction}_mean_rank"])
        assert ours[direction]["median_rank"] == pytest.approx(theirs[f"{direction}_median_rank"])
    assert 0 < ours["image_to_text"]["R@1"] < 100  # the case is not trivial


def test_retrieval_several_captions_per_image_hand_checked():
    # Images are the unit axes, so similarity(image k, caption j) is caption j's k-th entry.
    images = torch.eye(3)
    captions = torch.tensor([
        [0.80, 0.60, 0.00],  # c0, image 0
        [0.00, 0.60, 0.80],  # c1, image 0 (a caption that looks like image 2)
        [0.60, 0.64, 0.48],  # c2, image 1
        [0.60, 0.48, 0.64],  # c3, image 2
        [0.48, 0.60, 0.64],  # c4, image 2
    ])
    text_to_image = torch.tensor([0, 0, 1, 2, 2])
    m = retrieval_metrics(images, captions, text_to_image, ks=(1, 2, 10))
    # Image -> text, best own caption against the wrong ones:
    #   image 0: c0 0.80, no wrong caption >= 0.80            -> rank 1 (its bad caption c1 does not matter)
    #   image 1: c2 0.64 vs c0 0.60, c1 0.60, c3 0.48, c4 0.60 -> rank 1
    #   image 2: c3/c4 0.64 vs c1 0.80                          -> rank 2
    assert m["image_to_text"]["R@1"] == pytest.approx(200 / 3)
    assert m["image_to_text"]["R@2"] == pytest.approx(100.0)
    assert m["image_to_text"]["mean_rank"] == pytest.approx(4 / 3)
    assert m["image_to_text"]["median_rank"] == 1.0
    # Text -> image: c0 rank 1, c1 rank 3 (image 0 scores 0), c2, c3, c4 rank 1
    assert m["text_to_image"]["R@1"] == pytest.approx(80.0)
    assert m["text_to_image"]["R@2"] == pytest.approx(80.0)
    assert m["text_to_image"]["R@10"] == pytest.approx(100.0)
    assert m["text_to_image"]["mean_rank"] == pytest.approx(7 / 5)
    assert (m["n_images"], m["n_texts"]) == (3, 5)


def _brute_force_ranks(images, texts, text_to_image):
    """Straightforward loops: 1-based rank of the first correct item in the sorted list."""
    sims = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    i2t = []
    for i in range(sims.shape[0]):
        order = torch.argsort(sims[i], descending=True).tolist()
        i2t.append(next(pos for pos, j in enumerate(order) if text_to_image[j] == i) + 1)
    t2i = []
    for j in range(sims.shape[1]):
        order = torch.argsort(sims[:, j], descending=True).tolist()
        t2i.append(order.index(int(text_to_image[j])) + 1)
    return np.array(i2t), np.array(t2i)


def test_retrieval_several_captions_matches_brute_force_and_chunking():
    n_images, per_image = 30, 3
    images = _unit(n_images, 12, seed=5)
    text_to_image = torch.arange(n_images).repeat_interleave(per_image)
    texts = F.normalize(images[text_to_image] + 1.5 * _unit(len(text_to_image), 12, seed=6), dim=-1)
    i2t, t2i = _brute_force_ranks(images, texts, text_to_image)
    m = retrieval_metrics(images, texts, text_to_image, chunk_size=7)  # chunks must not change anything
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in (1, 5, 10):
            assert m[name][f"R@{k}"] == pytest.approx(100 * np.mean(ranks <= k))
        assert m[name]["mean_rank"] == pytest.approx(ranks.mean())


def test_retrieval_ties_count_against_the_query_and_bad_input_is_refused():
    collapsed = torch.ones(4, 8)  # every embedding equal: a collapsed model must not score 100%
    m = retrieval_metrics(collapsed, collapsed)
    assert m["image_to_text"]["R@1"] == 0.0 and m["text_to_image"]["mean_rank"] == 4.0
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((3, 4), float("nan")), _unit(3, 4, seed=0))
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(_unit(3, 4, seed=0), _unit(2, 4, seed=1), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(_unit(3, 4, seed=0), _unit(2, 4, seed=1))


# ----------------------------------------------------------------------------- zero-shot


def test_zero_shot_classifier_equals_open_clip_build_zero_shot_classifier(tiny_model):
    model, tokenizer, _ = tiny_model
    classnames = ["circle", "square", "triangle", "star", "hexagon", "cross", "heart"]
    templates = ["a photo of a {}.", "a drawing of a {}.", "a {} shape."]
    with torch.no_grad():
        ours = zero_shot_classifier(lambda texts: model.encode_text(tokenizer(texts)), classnames, templates,
                                    batch_size=5)  # batch size must not matter
        theirs = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates,
                                                      num_classes_per_batch=3)
    assert ours.shape == (len(classnames), TINY_CONFIG["embed_dim"])
    assert torch.allclose(ours, theirs.T, atol=1e-5)  # open_clip's is d x C
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(classnames)), atol=1e-5)


def test_zero_shot_accuracy_equals_direct_computation():
    n, d, c = 200, 16, 7
    classifier = _unit(c, d, seed=1)
    labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(2))
    images = F.normalize(classifier[labels] + 1.0 * _unit(n, d, seed=3), dim=-1)
    names = [f"class{i}" for i in range(c)]
    ours = zero_shot_accuracy(images, labels, classifier, topk=(1, 5), classnames=names)

    # Scored as open_clip_train.zero_shot.run does (its accuracy() helper itself fails on numpy 2.x):
    # a hit when the label is among the k largest logits.
    logits = 100.0 * images @ classifier.T
    ranking = logits.topk(5, dim=1).indices
    top1 = (ranking[:, :1] == labels[:, None]).any(dim=1).sum().item()
    top5 = (ranking == labels[:, None]).any(dim=1).sum().item()
    assert ours["top1"] == pytest.approx(100 * top1 / n)
    assert ours["top5"] == pytest.approx(100 * top5 / n)
    assert 0 < ours["top1"] < ours["top5"] <= 100

    pred = logits.argmax(dim=1)
    for i, name in enumerate(names):
        members = labels == i
        assert ours["per_class"][name] == pytest.approx(100 * (pred[members] == i).float().mean().item())
    assert ours["mean_per_class"] == pytest.approx(np.mean(list(ours["per_class"].values())))
    assert ours["n"] == n


def test_zero_shot_accuracy_leaves_out_trivial_top_k():
    classifier = _unit(3, 8, seed=0)
    result = zero_shot_accuracy(classifier, torch.arange(3), classifier)
    assert result["top1"] == 100.0 and "top5" not in result  # top-5 of 3 classes is always 100%
    with pytest.raises(ValueError):
        zero_shot_accuracy(classifier, torch.tensor([0, 1, 3]), classifier)


# ----------------------------------------------------------------------------- linear probe


def _blobs(n: int, d: int, n_classes: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(n_classes, d))
    y = rng.integers(0, n_classes, n)
    return centers[y] + spread * rng.normal(size=(n, d)), y


def test_linear_probe_separates_separable_data():
    xtr, ytr = _blobs(300, 16, 4, 0.2, seed=0)
    xva, yva = _blobs(100, 16, 4, 0.2, seed=1)
    xte, yte = _blobs(200, 16, 4, 0.2, seed=2)
    result = linear_probe(xtr, ytr, xva, yva, torch.tensor(xte), torch.tensor(yte))  # tensors work too
    assert result["accuracy"] >= 95.0
    assert result["C"] in (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
    assert result["val_accuracy"] == max(result["val_accuracy_by_C"].values())
    assert (result["n_train"], result["n_val"], result["n_test"], result["n_classes"]) == (300, 100, 200, 4)
    json.dumps(result)


def test_linear_probe_is_near_chance_on_random_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(900, 16))
    y = rng.integers(0, 3, 900)
    result = linear_probe(x[:500], y[:500], x[500:600], y[500:600], x[600:], y[600:], Cs=(0.1, 1.0, 10.0))
    assert 20.0 <= result["accuracy"] <= 47.0  # chance is 33%


def test_linear_probe_refuses_a_single_class():
    from clip_ping.errors import DataError

    x = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(DataError, match="two classes"):
        linear_probe(x, np.zeros(10), x, np.zeros(10), x, np.zeros(10))


# ----------------------------------------------------------------------------- runner


def test_evaluate_scores_a_tiny_model_on_tiny_data(tiny_model, tmp_path):
    model, tokenizer, preprocess = tiny_model
    data = _write_dataset(tmp_path / "data")
    # an undecodable test image (and its two captions) is dropped and counted, not fatal
    (data / "images" / "test_11.png").write_bytes(b"not a png")
    model.train()  # evaluate switches to eval mode and restores the mode afterwards
    result = evaluate(model, tokenizer, preprocess, data, "test", batch_size=5, workers=0,
                      linear_probe=True, probe_max_train=20, probe_cs=(0.1, 10.0), progress=False)
    assert model.training
    model.eval()
    json.dumps(result)  # JSON-serialisable as is

    assert (result["n_images"], result["n_texts"], result["n_undecodable_images"]) == (11, 22, 1)
    assert set(result["zeroshot"]) == {"color", "shape"}
    color = result["zeroshot"]["color"]
    assert set(color) >= {"top1", "mean_per_class", "per_class", "n"} and "top5" not in color  # 3 classes
    assert set(color["per_class"]) == set(COLORS) and color["n"] == 11
    r = result["retrieval"]
    assert (r["n_images"], r["n_texts"]) == (11, 22)
    for direction in ("image_to_text", "text_to_image"):
        assert set(r[direction]) == {"R@1", "R@5", "R@10", "mean_rank", "median_rank"}
        assert 0 <= r[direction]["R@1"] <= r[direction]["R@5"] <= r[direction]["R@10"] <= 100
    probe = result["linear_probe"]
    assert set(probe) == {"color", "shape"}
    assert probe["color"]["n_train"] == 20 and probe["color"]["n_val"] == 9 and probe["color"]["n_test"] == 11

    # the zero-shot number is the one a direct computation on the model's own embeddings gives
    from clip_ping.data.csv_reader import read_pairs
    from clip_ping.data.images import load_image

    table = read_pairs(data / "test.csv")
    rows = [i for i in range(0, len(table), 2) if not table.filepaths[i].endswith("test_11.png")]
    with torch.no_grad():
        feats = model.encode_image(torch.stack([preprocess(load_image(table.filepaths[i])) for i in rows]))
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, list(COLORS), ["a {} thing.", "something {}."])
    labels = torch.tensor([list(COLORS).index(table.labels["color"][i]) for i in rows])
    direct = 100 * ((feats @ classifier).argmax(dim=1) == labels).float().mean().item()
    assert color["top1"] == pytest.approx(direct)


def test_user_templates_and_tasks_files(tiny_model, tmp_path):
    model, tokenizer, preprocess = tiny_model
    data = _write_dataset(tmp_path / "data", n_train=6, n_val=3, n_test=6)
    (tmp_path / "templates.txt").write_text("# prompts\na {} object\n\nan image of {}\n")
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n  colour:\n    column: color\n    classes: [red, green, blue]\n    names: [crimson, lime, navy]\n")
    templates = read_templates_file(tmp_path / "templates.txt")
    tasks = read_tasks_file(tmp_path / "tasks.yaml")
    assert templates == ["a {} object", "an image of {}"]
    assert tasks["colour"]["names"] == ["crimson", "lime", "navy"]
    result = evaluate(model, tokenizer, preprocess, data, tasks=tasks, templates=templates, workers=0, progress=False)
    assert set(result["zeroshot"]) == {"colour"}
    assert set(result["zeroshot"]["colour"]["per_class"]) == {"red", "green", "blue"}  # keyed by label value
    assert "linear_probe" not in result

    (tmp_path / "bad.txt").write_text("no placeholder here\n")
    with pytest.raises(ConfigError, match="needs a"):
        read_templates_file(tmp_path / "bad.txt")
    (tmp_path / "bad.yaml").write_text("shape: {classes: [one]}\n")
    with pytest.raises(ConfigError, match="at least 2 classes"):
        read_tasks_file(tmp_path / "bad.yaml")


def test_evaluate_from_config_writes_eval_json(tiny_model, tmp_path, monkeypatch):
    import clip_ping.model.student

    model, tokenizer, preprocess = tiny_model
    data = _write_dataset(tmp_path / "data", n_train=6, n_val=3, n_test=6)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    seen = []
    monkeypatch.setattr(clip_ping.model.student, "load_student",
                        lambda path: seen.append(path) or (model, tokenizer, preprocess))
    cfg = EvalConfig(checkpoint=str(run), data=str(data), workers=0, linear_probe=False, progress=False)
    result = evaluate_from_config(cfg)
    assert seen == [str(run)]
    written = json.loads((run / "eval.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert default_output_path(run / "checkpoints" / "step_0000010.pt") == run / "eval.json"

    with pytest.raises(ConfigError):
        from clip_ping.config import from_dict

        from_dict(EvalConfig, {"batch_size": 0})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_runs_the_model_in_its_precision_and_records_it(tiny_model, tmp_path, monkeypatch, precision):
    import clip_ping.model.student

    model, tokenizer, preprocess = tiny_model
    data = _write_dataset(tmp_path / "data", n_train=6, n_val=3, n_test=6)
    seen = []

    class Recorded(torch.nn.Module):  # the model, noting whether bf16 autocast is on at each forward
        def __init__(self):
            super().__init__()
            self.inner = model

        def encode_image(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return self.inner.encode_image(x)

        def encode_text(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return self.inner.encode_text(x)

    monkeypatch.setattr(clip_ping.model.student, "load_student", lambda path: (Recorded(), tokenizer, preprocess))
    cfg = EvalConfig(checkpoint=str(tmp_path / "run"), data=str(data), workers=0, progress=False, precision=precision,
                     out=str(tmp_path / "eval.json"))
    result = evaluate_from_config(cfg)
    assert seen and set(seen) == {precision == "bf16"}
    assert json.loads((tmp_path / "eval.json").read_text())["precision"] == result["precision"] == precision
    assert "linear_probe" in result and "retrieval" in result
    with pytest.raises(ConfigError, match="'precision': 'fp16'"):
        evaluate_from_config(EvalConfig(checkpoint=str(tmp_path / "run"), data=str(data), precision="fp16"))


# ----------------------------------------------------------------------------- teacher reference

from clip_ping.teachers import (  # noqa: E402
    ImageTeacher,
    TextTeacher,
    load_image_teacher,
    load_text_teacher,
    register_image_teacher,
    register_text_teacher,
)


@register_image_teacher("test-eval-tiny-pixels")
class TinyPixelTeacher(ImageTeacher):
    """The image as 8 x 8 RGB pixels: colours are linearly separable, so the probe can find them."""

    def __init__(self, device="cpu"):
        self.name, self.dim, self.device = "test-eval-tiny-pixels", 192, device

    def transform(self, img):
        return torch.from_numpy(np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)

    def _forward(self, images):
        return images.flatten(1)


@register_text_teacher("test-eval-tiny-letters")
class TinyLetterTeacher(TextTeacher):
    """Letter counts: a text encoder with its own space, unrelated to the image teacher's."""

    def __init__(self, device="cpu"):
        self.name, self.dim, self.device = "test-eval-tiny-letters", 26, device

    def _forward(self, texts):
        return torch.tensor([[t.lower().count(c) + 0.1 for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts])


def test_teacher_reference_of_separate_teachers_is_a_linear_probe(tiny_model, tmp_path, monkeypatch):
    import clip_ping.model.student
    from clip_ping.report import build_report

    model, tokenizer, preprocess = tiny_model
    data = _write_dataset(tmp_path / "data", n_train=24, n_val=9, n_test=12)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(clip_ping.model.student, "load_student", lambda path: (model, tokenizer, preprocess))
    cfg = EvalConfig(checkpoint=str(run), data=str(data), workers=0, probe_max_train=20, probe_cs=[0.1, 10.0, 1000.0],
                     progress=False, teacher_reference=True, image_teacher="test-eval-tiny-pixels",
                     text_teacher="test-eval-tiny-letters")
    result = evaluate_from_config(cfg)

    ref = result["teacher_reference"]
    assert (ref["image_teacher"], ref["text_teacher"], ref["shared_space"]) == (
        "test-eval-tiny-pixels", "test-eval-tiny-letters", False)
    assert "zeroshot" not in ref and "retrieval" not in ref  # no shared space: not scored ...
    assert "share no embedding space" in ref["skipped"]["zeroshot"]  # ... and the reason recorded
    assert "share no embedding space" in ref["skipped"]["retrieval"]
    assert set(ref["linear_probe"]) == {"color", "shape"}
    for task in ("color", "shape"):  # the same train sub-sample and test images as the student's probe
        for key in ("n_train", "n_val", "n_test"):
            assert ref["linear_probe"][task][key] == result["linear_probe"][task][key]
    assert ref["linear_probe"]["color"]["accuracy"] >= 90.0
    assert "skipped" not in result  # the student itself was scored fully
    assert json.loads((run / "eval.json").read_text()) == json.loads(json.dumps(result))

    # the report reads an eval.json with the extra key; the student's numbers stay where they were
    report = build_report([run], tmp_path / "report")
    results = json.loads((report.parent / "results.json").read_text())
    top1 = results["metrics"]["zeroshot/color/top1"]["settings"]
    assert list(top1.values())[0]["mean"] == pytest.approx(result["zeroshot"]["color"]["top1"])


def test_teacher_reference_of_one_open_clip_model_scores_zero_shot_and_retrieval(tiny_model, tmp_path):
    from clip_ping.evaluation.runner import evaluate_teachers, shared_space_problem

    model, tokenizer, preprocess = tiny_model
    data = _write_dataset(tmp_path / "data", n_train=6, n_val=3, n_test=6)
    weights = tmp_path / "tiny.pt"
    torch.save({"model": model.state_dict()}, weights)
    spec = f"open_clip:{TINY_MODEL}:{weights}"
    assert shared_space_problem(spec, spec) is None
    assert shared_space_problem(spec, "all-minilm-l6-v2") is not None

    kwargs = dict(workers=0, probe_max_train=None, probe_cs=(1.0,), progress=False)
    ref = evaluate_teachers(load_image_teacher(spec), load_text_teacher(spec), data, **kwargs)
    student = evaluate(model, tokenizer, preprocess, data, linear_probe=True, **kwargs)
    assert ref["shared_space"] and "skipped" not in ref
    # the teacher pair *is* the student here, so every number agrees
    for task in ("color", "shape"):
        assert ref["zeroshot"][task]["top1"] == pytest.approx(student["zeroshot"][task]["top1"])
        assert ref["linear_probe"][task]["accuracy"] == pytest.approx(student["linear_probe"][task]["accuracy"])
    for direction in ("image_to_text", "text_to_image"):
        for key, value in student["retrieval"][direction].items():
            assert ref["retrieval"][direction][key] == pytest.approx(value)
