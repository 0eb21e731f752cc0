"""`clip-ping eval --suite FILE --with-clip-benchmark`: clip_benchmark's own metrics beside clip-ping's.

For every zero-shot and retrieval task of a suite, clip_benchmark's
``zeroshot_classification.evaluate`` / ``zeroshot_retrieval.evaluate`` run on
the exported open_clip model (loaded by open_clip from the export folder, as
clip_benchmark's open_clip loader does) and the same images, class names,
templates and captions. clip_benchmark's WebDataset tasks are read by
clip_benchmark's own ``build_dataset("wds/...")``; the other layouts are
handed to it as torch datasets. AMP is off so both sides compute in float32.

Where the figures differ by definition (each tested in tests/test_clip_benchmark.py):

- **top-5**: clip_benchmark reports ``acc5`` for 5 or more classes (100% by
  construction with exactly 5); clip-ping omits a top-k with k >= classes.
- **retrieval**: clip_benchmark's recall is per caption row: every caption is
  a query and a gallery item, a hit is a correct item among ``torch.topk``'s k
  indices. clip-ping's ``retrieval_per_row`` is that figure. Its headline
  ``retrieval`` counts identical caption texts as one text (a hit on any image
  carrying it) and counts ties against the query; it equals the per-row figure
  when all captions differ and no scores tie.
- **templates**: each side uses the templates it is given. Without a
  templates entry clip-ping falls back to the layout's file, then to its own
  default prompts, while clip_benchmark's named data sets carry their own
  lists (``en_zeroshot_classification_templates.json``): pass the same file
  to compare.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..environment import require
from .layouts import ClassificationSet, RetrievalSet
from .suite_file import open_classification, open_retrieval


def _format_template(template: str) -> str:
    """clip-ping's ``{}`` prompt as clip_benchmark's ``str.format`` template with ``{c}``."""
    return template.replace("{", "{{").replace("}", "}}").replace("{{}}", "{c}")


class _ClassificationData(torch.utils.data.Dataset):
    def __init__(self, data: ClassificationSet, preprocess: Callable) -> None:
        self.data, self.preprocess, self.classes = data, preprocess, data.classnames

    def __len__(self) -> int:
        return len(self.data.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.preprocess(self.data.images.open_image(i)), int(self.data.labels[i])


class _RetrievalData(torch.utils.data.Dataset):
    def __init__(self, data: RetrievalSet, preprocess: Callable) -> None:
        self.data, self.preprocess = data, preprocess
        self.captions: list[list[str]] = [[] for _ in range(len(data.images))]
        for caption, image in zip(data.captions, data.text_to_image):
            self.captions[image].append(caption)

    def __len__(self) -> int:
        return len(self.data.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[str]]:
        return self.preprocess(self.data.images.open_image(i)), self.captions[i]


def zeroshot(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, data: ClassificationSet | None,
             *, wds_root: str | None = None, split: str = "test", batch_size: int = 64,
             device: str = "cpu") -> dict[str, float]:
    """clip_benchmark's zero-shot classification, in %: ``{"top1", "top5", "mean_per_class"}``.

    ``wds_root``: read the data with clip_benchmark's own WebDataset builder instead of ``data``
    (class names and templates then come from the folder, as clip_benchmark reads them).
    """
    require("clip-benchmark")
    from clip_benchmark.metrics import zeroshot_classification

    if wds_root is not None:
        from clip_benchmark.datasets.builder import build_dataset

        dataset = build_dataset("wds/eval", root=wds_root, transform=preprocess, split=split)
        classnames, templates = dataset.classes, dataset.templates
    else:
        assert data is not None, "a ClassificationSet or a wds_root is needed"
        dataset = _ClassificationData(data, preprocess)
        classnames, templates = data.classnames, [_format_template(t) for t in data.templates]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    # clip_benchmark's classifier and logits. Its evaluate() then fails under NumPy >= 2.x (float() of a
    # 1-element array in accuracy()), so its last step is done here with the same definitions.
    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, classnames, templates, device, amp=False)
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, device, amp=False)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top == target[:, None]

    def accuracy(k: int) -> float:
        return 100.0 * float(correct[:, :k].any(dim=1).float().mean())

    from sklearn.metrics import balanced_accuracy_score  # clip_benchmark's mean per-class recall

    return {"top1": accuracy(1), "top5": accuracy(5) if len(classnames) >= 5 else float("nan"),
            "mean_per_class": 100.0 * float(balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy()))}


def retrieval(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, data: RetrievalSet | None,
              *, wds_root: str | None = None, split: str = "test", batch_size: int = 64, device: str = "cpu",
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """clip_benchmark's retrieval recall in %: ``{"image_to_text": {"R@k"}, "text_to_image": {"R@k"}}``."""
    require("clip-benchmark")
    from clip_benchmark.datasets.builder import image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval

    if wds_root is not None:
        from clip_benchmark.datasets.builder import build_dataset

        dataset = build_dataset("wds/eval", root=wds_root, transform=preprocess, split=split, task="zeroshot_retrieval")
    else:
        assert data is not None, "a RetrievalSet or a wds_root is needed"
        dataset = _RetrievalData(data, preprocess)
        ks = [k for k in ks if k <= len(dataset)]  # clip_benchmark's recall@k needs k <= the images
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=image_captions_collate_fn)
    scores = zeroshot_retrieval.evaluate(model, loader, tokenizer, device, amp=False, recall_k_list=list(ks))
    # clip_benchmark's "image retrieval" is text -> image, its "text retrieval" image -> text
    return {"image_to_text": {f"R@{k}": 100 * scores[f"text_retrieval_recall@{k}"] for k in ks},
            "text_to_image": {f"R@{k}": 100 * scores[f"image_retrieval_recall@{k}"] for k in ks}}


def run_task(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, task: Any,
             batch_size: int = 64, device: str = "cpu") -> dict[str, Any]:
    """clip_benchmark's figures for one `SuiteTask` (zero-shot or retrieval; other kinds: empty)."""

    wds = task.path if task.layout == "wds" and not task.templates and not task.classnames else None
    if task.kind == "zeroshot" and task.layout != "data":
        classes = None if wds else open_classification(task, task.split)
        return zeroshot(model, tokenizer, preprocess, classes, wds_root=wds, split=task.split,
                        batch_size=batch_size, device=device)
    if task.kind == "retrieval" and task.layout != "data":
        pairs = None if wds else open_retrieval(task)
        return retrieval(model, tokenizer, preprocess, pairs, wds_root=wds, split=task.split,
                         batch_size=batch_size, device=device)
    return {}
