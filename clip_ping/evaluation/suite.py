"""`clip-ping eval --suite FILE.yaml`: run every task of a suite file (`suite_file`) on one model, one table.

The metric definitions are the ones of `zeroshot`, `retrieval` and `linear_probe` (retrieval
reports both the project's figure and clip_benchmark's per-row figure); `clip_benchmark_run`
adds clip_benchmark's own figures beside them when asked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .coverage import coverage, report_coverage
from .layouts import ClassificationSet, RetrievalSet
from .linear_probe import DEFAULT_CS
from .linear_probe import linear_probe as fit_linear_probe
from .retrieval import caption_ids, retrieval_metrics, retrieval_metrics_per_row
from .runner import evaluate
from .suite_file import SuiteTask, open_classification, open_retrieval
from .zeroshot import zero_shot_accuracy, zero_shot_classifier

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- running


@dataclass
class _Encoder:
    """The model and its settings, shared by every task of a suite."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], Tensor]
    preprocess: Callable
    batch_size: int = 256
    workers: int = 0
    device: str = "cpu"
    progress: bool = True

    def images(self, table: Any, desc: str, rows: Sequence[int] | None = None) -> tuple[Tensor, list[int], int]:
        """(unit-length features, the rows that decoded, in feature order, how many did not)."""
        from .encode import encode_images

        rows = range(len(table)) if rows is None else rows
        return encode_images(self.model, table, self.preprocess, rows, self.batch_size,
                             self.workers, self.device, self.progress, desc)

    def texts(self, texts: Sequence[str]) -> Tensor:
        from .encode import encode_texts

        return encode_texts(self.model, self.tokenizer, texts, self.batch_size, self.device)


def _coverage(name: str, data: ClassificationSet | RetrievalSet, n_errors: int) -> dict[str, Any]:
    """The task's images, of which those left out by the layout or undecodable were not scored."""
    note = (f"{len(data.cut)} shard(s) cut short ({', '.join(data.cut[:3])}): the samples after each cut were "
            "not read, and their number is unknown") if data.cut else None
    found = coverage(len(data.images) + sum(data.skipped.values()), {**data.skipped, "undecodable_image": n_errors}, note)
    report_coverage(f"task '{name}'", found)
    return found


def zeroshot_task(enc: _Encoder, data: ClassificationSet, name: str = "zeroshot") -> dict[str, Any]:
    features, kept, n_errors = enc.images(data.images, f"{name} images")
    classifier = zero_shot_classifier(enc.texts, data.classnames, data.templates, enc.batch_size)
    scores = zero_shot_accuracy(features, torch.from_numpy(data.labels[kept]), classifier, topk=(1, 5),
                                classnames=data.classnames)
    scores.pop("per_class")
    return {**scores, "n_classes": len(data.classnames), "n_templates": len(data.templates),
            "n_undecodable_images": n_errors, "skipped": data.skipped, "coverage": _coverage(name, data, n_errors)}


def retrieval_task(enc: _Encoder, data: RetrievalSet, name: str = "retrieval") -> dict[str, Any]:
    features, kept, n_errors = enc.images(data.images, f"{name} images")
    position = {row: i for i, row in enumerate(kept)}
    # Captions of images that did not decode cannot be retrieved correctly: left out, like their images.
    rows = [j for j, image in enumerate(data.text_to_image) if image in position]
    captions = [data.captions[j] for j in rows]
    texts = enc.texts(captions)
    text_to_image = torch.tensor([position[data.text_to_image[j]] for j in rows], dtype=torch.long)
    return {"retrieval": retrieval_metrics(features, texts, text_to_image, text_ids=caption_ids(captions)),
            "retrieval_per_row": retrieval_metrics_per_row(features, texts, text_to_image),
            "n_images": int(features.shape[0]), "n_texts": len(rows),
            "n_undecodable_images": n_errors, "skipped": data.skipped, "coverage": _coverage(name, data, n_errors)}


def linear_probe_task(enc: _Encoder, task: SuiteTask, max_train: int | None, cs: Sequence[float],
                      seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def features(split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        data = open_classification(task, split)
        rows = None
        if limit is not None and len(data.images) > limit:  # a seeded sub-sample, kept in file order
            rows = np.sort(rng.choice(len(data.images), size=limit, replace=False)).tolist()
        x, kept, _ = enc.images(data.images, f"{task.name} {split} images (probe)", rows)
        return x.numpy(), data.labels[kept], data.classnames

    xtr, ytr, names = features(task.train_split, max_train)
    xte, yte, test_names = features(task.split, None)
    if test_names != names:
        raise DataError(f"task '{task.name}': the {task.train_split} and {task.split} splits have different classes")
    try:
        xva, yva, _ = features(task.val_split, max_train)
    except DataError as exc:
        log.info("task '%s': no %s split (%s); holding out 20%% of the train sample", task.name, task.val_split, exc)
        mask = np.zeros(len(ytr), dtype=bool)
        mask[rng.permutation(len(ytr))[: max(1, len(ytr) // 5)]] = True
        xtr, xva, ytr, yva = xtr[~mask], xtr[mask], ytr[~mask], ytr[mask]
    return fit_linear_probe(xtr, ytr, xva, yva, xte, yte, Cs=cs, seed=seed)


def _data_folder_task(enc: _Encoder, task: SuiteTask, max_train: int | None, cs: Sequence[float],
                      seed: int) -> dict[str, Any]:
    """A clip-ping data set folder, scored by the runner (``layout: data``)."""

    result = evaluate(enc.model, enc.tokenizer, enc.preprocess, task.path, task.split, batch_size=enc.batch_size,
                      workers=enc.workers, linear_probe=task.kind == "linear_probe", probe_max_train=max_train,
                      probe_cs=cs, seed=seed, device=enc.device, progress=enc.progress)
    if task.kind == "retrieval":
        if "retrieval" not in result:
            raise DataError(f"task '{task.name}': {task.path} has no captions to retrieve")
        return {k: result[k] for k in ("retrieval", "retrieval_per_row", "n_images", "n_texts")}
    part = result.get("zeroshot" if task.kind == "zeroshot" else "linear_probe") or {}
    if not part:
        raise DataError(f"task '{task.name}': {task.path} has no classification task to score ({task.kind})")
    return {sub: {k: v for k, v in scores.items() if k != "per_class"} for sub, scores in part.items()}


@torch.inference_mode()
def run_suite(model: torch.nn.Module, tokenizer: Callable[[list[str]], Tensor], preprocess: Callable,
              tasks: Sequence[SuiteTask], *, batch_size: int = 256, workers: int = 0, device: str = "cpu",
              progress: bool = True, probe_max_train: int | None = 2000, probe_cs: Sequence[float] = DEFAULT_CS,
              seed: int = 0, with_clip_benchmark: bool = False) -> dict[str, Any]:
    """Every task's results, plus ``table``: one row per (task, metric), see `suite_table`.

    ``with_clip_benchmark``: also clip_benchmark's figures of every zero-shot and retrieval task
    (under the task's ``"clip_benchmark"``; `clip_ping.evaluation.clip_benchmark_run`)."""
    if with_clip_benchmark:
        from ..environment import require

        require("clip-benchmark")
    enc = _Encoder(model, tokenizer, preprocess, batch_size, workers, device, progress)
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        for task in tasks:
            log.info("suite task '%s': %s on %s (%s)", task.name, task.kind, task.path, task.layout)
            if task.layout == "data":
                results[task.name] = _data_folder_task(enc, task, probe_max_train, probe_cs, seed)
            elif task.kind == "zeroshot":
                results[task.name] = zeroshot_task(enc, open_classification(task, task.split), task.name)
            elif task.kind == "retrieval":
                results[task.name] = retrieval_task(enc, open_retrieval(task), task.name)
            else:
                results[task.name] = linear_probe_task(enc, task, probe_max_train, probe_cs, seed)
            if with_clip_benchmark and task.kind != "linear_probe" and task.layout != "data":
                from . import clip_benchmark_run

                results[task.name]["clip_benchmark"] = clip_benchmark_run.run_task(
                    model, tokenizer, preprocess, task, batch_size, device)
    finally:
        model.train(was_training)
    return {"tasks": results, "table": suite_table(tasks, results)}


# --------------------------------------------------------------------------- the table

_HEADLINES = {
    "zeroshot": [("top1", "top-1 %"), ("top5", "top-5 %"), ("mean_per_class", "mean per-class %")],
    "linear_probe": [("accuracy", "accuracy %")],
}
_RECALL = [("image_to_text", "R@1"), ("image_to_text", "R@5"), ("image_to_text", "R@10"),
           ("text_to_image", "R@1"), ("text_to_image", "R@5"), ("text_to_image", "R@10")]


def suite_table(tasks: Sequence[SuiteTask], results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{"task", "kind", "metric", "value", "n"}`` in suite order."""
    rows = []
    for task in tasks:
        result = results[task.name]
        if task.kind == "retrieval":
            n = result.get("n_images")
            for key, label in (("retrieval", ""), ("retrieval_per_row", " (per row)"),
                               ("clip_benchmark", " (clip_benchmark)")):
                for direction, k in _RECALL:
                    value = result.get(key, {}).get(direction, {}).get(k)
                    if value is not None:
                        arrow = "image->text" if direction == "image_to_text" else "text->image"
                        rows.append({"task": task.name, "kind": task.kind, "metric": f"{arrow} {k}{label}",
                                     "value": value, "n": n})
            continue
        # data-folder tasks hold one result per label task; the others are one result
        parts = result.items() if task.layout == "data" else [(None, result)]
        if "clip_benchmark" in result:
            parts = [(None, result), (None, {**result["clip_benchmark"], "n": result.get("n"), "_by": " (clip_benchmark)"})]
        for sub, scores in parts:
            for key, label in _HEADLINES[task.kind]:
                if key in scores and scores[key] == scores[key]:  # NaN: not defined (clip_benchmark's top-5 < 5 classes)
                    rows.append({"task": task.name if sub is None else f"{task.name}/{sub}", "kind": task.kind,
                                 "metric": label + scores.get("_by", ""), "value": scores[key],
                                 "n": scores.get("n", scores.get("n_test"))})
    return rows


def suite_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| task | kind | metric | value | n |", "|---|---|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['task']} | {row['kind']} | {row['metric']} | {row['value']:.2f} | {row['n'] or ''} |")
    return "\n".join(lines) + "\n"
