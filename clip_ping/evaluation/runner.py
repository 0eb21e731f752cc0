"""`clip-ping eval`: encode a data set split with an open_clip model and score it.

What is measured (METHOD.md, "Evaluation protocol"):

- zero-shot classification for every task of the data set (``dataset.json``,
  or one task per label column), prompts from the task's templates;
- image-to-text and text-to-image retrieval on the split. Rows that share an
  image file are several captions of one image: the image is encoded once and
  a hit on any of its captions counts; identical caption texts are one text
  (`retrieval`); clip_benchmark's per-row figure is reported beside it
  (``retrieval_per_row``);
- optionally a linear probe per task: logistic regression on the frozen image
  features of the train split (sub-sampled), C chosen on the val split.

The data may also be an image folder, one sub-folder per class (``DATA/<class>/``,
or ``DATA/<split>/<class>/`` for several splits; see `clip_ping.data.folders`):
one zero-shot task ``class`` named after the folders, no retrieval (there are
no captions), and a linear probe only when there are train/ and val/ folders.

Optionally the frozen teacher pair is scored the same way as a reference point
(`evaluate_teachers`): a linear probe on the image teacher's features, and
zero-shot and retrieval only when both teachers are the towers of one open_clip
model (separately trained teachers have no shared embedding space).

The result is one JSON-serialisable dict::

    {"zeroshot": {task: {"top1", "top5", "mean_per_class", "per_class", "n"}},
     "retrieval": {"image_to_text": {"R@1", ...}, "text_to_image": {...}, ...},
     "linear_probe": {task: {"accuracy", "C", ...}},
     "skipped": {"retrieval": "why", ...},          # only when something was not scored
     "teacher_reference": {"image_teacher", "text_teacher", "shared_space", "linear_probe", ...},
     "n_images": .., "n_texts": .., ...}
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..data.table import folder_layout, open_table
from ..errors import DataError
from .coverage import coverage, report_coverage
from .encode import SplitImages, distinct_image_rows, encode_split_images, encode_texts
from .linear_probe import DEFAULT_CS
from .linear_probe import linear_probe as fit_linear_probe
from .retrieval import caption_ids, retrieval_metrics, retrieval_metrics_per_row
from .tasks import resolve_tasks
from .zeroshot import zero_shot_accuracy, zero_shot_classifier

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data


def image_folder_tasks(table: Any) -> dict[str, dict[str, Any]]:
    """The zero-shot task of an image folder: its classes, in folder order."""
    return {"class": {"column": "class", "classes": list(dict.fromkeys(table.labels["class"]))}}


# --------------------------------------------------------------------------- labels


def _label_ids(values: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Class id of each label value, -1 when the value is not one of ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(v, -1) for v in values], dtype=np.int64)


def _image_labels(table: Any, images: SplitImages, column: str, classes: Sequence[str]) -> np.ndarray | None:
    """Class id of every encoded image (from its first row), or None when the column is absent."""
    if column not in table.labels:
        return None
    values = table.labels[column]
    return _label_ids([values[row] for row in images.rows], classes)


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(
    model: Any,
    tokenizer: Callable[[list[str]], Any],
    preprocess: Callable,
    data_dir: str | Path,
    split: str = "test",
    *,
    batch_size: int = 256,
    workers: int = 0,
    tasks: dict[str, dict[str, Any]] | None = None,
    templates: Sequence[str] | None = None,
    names_file: str | None = None,
    cross_modal: bool = True,
    linear_probe: bool = False,
    probe_max_train: int | None = 2000,
    probe_cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot, retrieval and (optionally) linear-probe results of ``model`` on ``split``.

    ``model`` is an open_clip model (anything with ``encode_image`` and
    ``encode_text``), ``tokenizer`` maps strings to tokens, ``preprocess`` maps a
    PIL image to a tensor. ``tasks`` replaces the data set's zero-shot tasks and
    ``templates`` every task's prompts. ``data_dir`` may be an image folder
    (``names_file`` maps its folder names to class names). ``cross_modal=False``
    (image and text embeddings not comparable) scores the linear probe only.
    What was not scored is listed, with the reason, under ``"skipped"``. The
    model is put in eval mode for the call and its previous mode restored afterwards.
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data set folder not found: {data_dir}")
    layout = folder_layout(data_dir, split)
    skipped: dict[str, str] = {}
    if not cross_modal:
        skipped["zeroshot"] = skipped["retrieval"] = "the image and text encoders do not share an embedding space"
    elif layout is not None:
        skipped["retrieval"] = "image-folder data set: no captions to retrieve"
    if linear_probe and layout == "classes":
        skipped["linear_probe"] = "image folder without train/ and val/ sub-folders"
    was_training = model.training
    model.eval()
    try:
        table = open_table(data_dir, split, names_file)
        images = encode_split_images(model, table, preprocess, None, batch_size, workers, device, progress, f"{split} images")
        result: dict[str, Any] = {
            "split": split,
            "data": str(data_dir),
            "n_images": int(images.features.shape[0]),
            "n_texts": 0,
            "n_undecodable_images": images.n_decode_errors,
        }
        resolved = resolve_tasks(data_dir, tasks if tasks is not None or layout is None else image_folder_tasks(table),
                                 templates)

        def encode(texts: list[str]) -> Tensor:
            return encode_texts(model, tokenizer, texts, batch_size, device)

        # rows the data reader left out (missing files, bad rows, samples of a damaged shard) are
        # rows of the split that no score stands on
        read_out = {f"left out by the reader: {reason}": n for reason, n in dict(table.skipped).items()}
        if "zeroshot" not in skipped:
            result["zeroshot"] = _zero_shot(resolved, table, images, encode, read_out)
        if "retrieval" not in skipped:
            # Captions of images that failed to decode cannot be retrieved correctly: leave them out.
            text_rows = [row for row in range(len(table)) if row in images.row_to_image]
            texts = encode_texts(model, tokenizer, [table.captions[r] for r in text_rows], batch_size, device, progress)
            text_to_image = torch.tensor([images.row_to_image[r] for r in text_rows], dtype=torch.long)
            result["n_texts"] = len(text_rows)
            result["retrieval"] = retrieval_metrics(images.features, texts, text_to_image,
                                                    text_ids=caption_ids([table.captions[r] for r in text_rows]))
            result["retrieval_per_row"] = retrieval_metrics_per_row(images.features, texts, text_to_image)
            result["retrieval"]["coverage"] = coverage(
                len(table) + sum(read_out.values()),
                {**read_out, "caption_of_an_undecodable_image": len(table) - len(text_rows)})
            report_coverage(f"retrieval on {data_dir} ({split})", result["retrieval"]["coverage"])
        if linear_probe and "linear_probe" not in skipped:
            result["linear_probe"] = _linear_probes(
                model, preprocess, lambda s: open_table(data_dir, s, names_file), split, resolved, table,
                images, batch_size, workers, probe_max_train, probe_cs, seed, device, progress)
        if skipped:
            result["skipped"] = skipped
        result["seconds"] = round(time.perf_counter() - t0, 2)
        return result
    finally:
        model.train(was_training)


def _zero_shot(tasks: dict[str, dict[str, Any]], table: Any, images: SplitImages,
               encode: Callable[[list[str]], Tensor], read_out: dict[str, int]) -> dict[str, Any]:
    results = {}
    for name, task in tasks.items():
        labels = _image_labels(table, images, task["column"], task["classes"])
        if labels is None:
            log.warning("zero-shot task '%s' skipped: the split has no column '%s'", name, task["column"])
            continue
        known = labels >= 0
        if not known.any():
            log.warning("zero-shot task '%s' skipped: no image has one of its classes", name)
            continue
        classifier = zero_shot_classifier(encode, task.get("names") or task["classes"], task["templates"])
        scores = zero_shot_accuracy(images.features[torch.from_numpy(known)], torch.from_numpy(labels[known]),
                                    classifier, topk=(1, 5), classnames=task["classes"])
        scores["n_unknown_label"] = int((~known).sum())
        # counted in distinct images, as scored (rows sharing an image are one)
        scores["coverage"] = coverage(len(images.rows) + images.n_decode_errors + sum(read_out.values()),
                                      {**read_out, "undecodable_image": images.n_decode_errors,
                                       "label_not_among_the_task_classes": scores["n_unknown_label"]})
        report_coverage(f"zero-shot task '{name}'", scores["coverage"])
        results[name] = scores
    return results


def _linear_probes(model, preprocess, read: Callable[[str], Any], split: str, tasks: dict[str, dict[str, Any]],
                   test_table: Any, test_images: SplitImages, batch_size: int, workers: int, max_train: int | None,
                   cs: Sequence[float], seed: int, device: str, progress: bool) -> dict[str, Any]:
    """One probe per task: features of train (sub-sampled) and val images, tested on ``split``.

    ``read(split)`` gives a split's table."""
    rng = np.random.default_rng(seed)
    if split in ("train", "val"):
        log.warning("linear probe tested on the %s split, which it also fits or selects C on: "
                    "its accuracy is optimistic", split)

    def sample_rows(table, limit):
        heads, _ = distinct_image_rows(table.image_ids)
        if limit is not None and len(heads) > limit:
            heads = sorted(rng.choice(heads, size=limit, replace=False).tolist())
        return heads

    try:
        train_table = read("train")
    except DataError as exc:
        log.warning("linear probe skipped: %s", exc)
        return {}
    train = encode_split_images(model, train_table, preprocess, sample_rows(train_table, max_train),
                                 batch_size, workers, device, progress, "train images (probe)")
    try:
        val_table = read("val")
        val = encode_split_images(model, val_table, preprocess, sample_rows(val_table, max_train),
                                   batch_size, workers, device, progress, "val images (probe)")
    except DataError as exc:
        log.warning("linear probe: no usable val split (%s); holding out 20%% of the train sample", exc)
        val_table, val = None, None

    results = {}
    for name, task in tasks.items():
        column, classes = task["column"], task["classes"]
        ytr = _image_labels(train_table, train, column, classes)
        yte = _image_labels(test_table, test_images, column, classes)
        if ytr is None or yte is None:
            log.warning("linear probe '%s' skipped: no column '%s' in train and %s", name, column, split)
            continue
        xtr = train.features.numpy()
        if val is not None and (yva := _image_labels(val_table, val, column, classes)) is not None:
            xva = val.features.numpy()
        else:
            held_out = rng.permutation(len(ytr))[: max(1, len(ytr) // 5)]
            mask = np.zeros(len(ytr), dtype=bool)
            mask[held_out] = True
            xtr, xva, ytr, yva = xtr[~mask], xtr[mask], ytr[~mask], ytr[mask]
        xte = test_images.features.numpy()
        # Rows whose label is not one of the task's classes take no part.
        keep_tr, keep_va, keep_te = ytr >= 0, yva >= 0, yte >= 0
        try:
            results[name] = fit_linear_probe(xtr[keep_tr], ytr[keep_tr], xva[keep_va], yva[keep_va],
                                             xte[keep_te], yte[keep_te], Cs=cs, seed=seed)
        except DataError as exc:
            log.warning("linear probe '%s' skipped: %s", name, exc)
    return results


# --------------------------------------------------------------------------- teacher reference


class TeacherPair:
    """The frozen teachers seen as a dual encoder: the interface `evaluate` needs.

    Its "tokenizer" is ``list``: the text teacher takes strings and tokenizes itself.
    """

    training = False

    def __init__(self, image_teacher: Any, text_teacher: Any) -> None:
        self.image_teacher, self.text_teacher = image_teacher, text_teacher

    def eval(self) -> "TeacherPair":
        return self

    def train(self, mode: bool = True) -> "TeacherPair":
        return self  # frozen: always in eval mode

    def encode_image(self, images: Tensor) -> Tensor:
        return self.image_teacher.encode(images)

    def encode_text(self, texts: list[str]) -> Tensor:
        return self.text_teacher.encode(texts)


def shared_space_problem(image_spec: str, text_spec: str) -> str | None:
    """None when the two teachers embed into one space (both towers of one open_clip model), else why not."""
    if image_spec.strip() == text_spec.strip() and image_spec.strip().startswith("open_clip:"):
        return None
    return (f"not applicable: the teachers '{image_spec}' and '{text_spec}' were trained separately and share no "
            "embedding space (zero-shot and retrieval need both towers of one model, e.g. the same "
            "open_clip:<model>:<weights> spec for both)")


def evaluate_teachers(image_teacher: Any, text_teacher: Any, data_dir: str | Path, split: str = "test",
                      **kwargs: Any) -> dict[str, Any]:
    """`evaluate` a loaded teacher pair (`clip_ping.teachers.load_image_teacher` / ``load_text_teacher``).

    Always a linear probe on the image teacher's features (the student's protocol and
    train sub-sample, given the same arguments); zero-shot and retrieval only when
    `shared_space_problem` finds none. ``kwargs`` go to `evaluate`.
    """
    problem = shared_space_problem(image_teacher.name, text_teacher.name)
    kwargs["linear_probe"] = True
    result = evaluate(TeacherPair(image_teacher, text_teacher), list, image_teacher.transform, data_dir, split,
                      cross_modal=problem is None, **kwargs)
    if problem:
        result["skipped"].update(zeroshot=problem, retrieval=problem)
    return {"image_teacher": image_teacher.name, "text_teacher": text_teacher.name,
            "shared_space": problem is None, **result}
