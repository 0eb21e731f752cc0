"""Zero-shot classification: class embeddings from prompt templates, then top-k accuracy.

A class embedding is the field's definition (CLIP, open_clip): embed every
prompt "template with the class name filled in", L2-normalise each, average
over the templates, and L2-normalise the mean. An image is assigned the class
whose embedding has the highest cosine similarity with the image embedding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def fill_template(template: str, name: str) -> str:
    # replace() rather than format(): a template may contain other braces.
    return template.replace("{}", name)


def zero_shot_classifier(
    encode_text: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """Class embeddings, C x d (row c is class c), each of unit length.

    ``encode_text`` maps a list of strings to their embeddings (n x d); it need
    not normalise, this function does. Prompts are encoded ``batch_size`` at a time.
    """
    if not classnames:
        raise ValueError("zero_shot_classifier needs at least one class name")
    if not templates:
        raise ValueError("zero_shot_classifier needs at least one prompt template")
    prompts = [fill_template(t, name) for name in classnames for t in templates]
    chunks = [encode_text(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    embeddings = F.normalize(torch.cat(chunks).float(), dim=-1)
    per_class = embeddings.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def zero_shot_accuracy(
    image_features: Tensor,
    labels: Tensor,
    classifier: Tensor,
    topk: Sequence[int] = (1, 5),
    classnames: Sequence[str] | None = None,
) -> dict:
    """Top-k accuracy (in %) of ``image_features`` (N x d) against ``classifier`` (C x d).

    Returns ``{"top1": .., "top5": .., "mean_per_class": .., "per_class": {class: ..}, "n": N}``.
    A ``top{k}`` with k >= C is left out: it would be 100% whatever the model.
    ``per_class`` is the top-1 accuracy among the images of each class that occurs
    in ``labels`` (keyed by ``classnames`` when given, else by class id);
    ``mean_per_class`` is their mean (balanced accuracy).
    """
    labels = labels.long().reshape(-1)
    if image_features.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_features.shape[0]} image features but {labels.shape[0]} labels")
    n_classes = classifier.shape[0]
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}); filter unknown labels first")
    if classnames is not None and len(classnames) != n_classes:
        raise ValueError(f"{len(classnames)} class names for a {n_classes}-class classifier")

    # Image normalisation does not change the ranking of classes, but keeps logits cosines.
    logits = F.normalize(image_features.float(), dim=-1) @ classifier.float().T
    result: dict = {}
    for k in topk:
        if k >= n_classes and k != 1:
            continue
        top = logits.topk(min(k, n_classes), dim=1).indices
        hit = (top == labels[:, None]).any(dim=1)
        result[f"top{k}"] = 100.0 * hit.sum().item() / labels.numel() if labels.numel() else float("nan")

    correct = logits.argmax(dim=1) == labels
    per_class: dict[str, float] = {}
    for c in range(n_classes):
        members = labels == c
        if members.any():
            name = classnames[c] if classnames is not None else str(c)
            per_class[name] = 100.0 * correct[members].sum().item() / members.sum().item()
    result["mean_per_class"] = sum(per_class.values()) / len(per_class) if per_class else float("nan")
    result["per_class"] = per_class
    result["n"] = int(labels.numel())
    return result
