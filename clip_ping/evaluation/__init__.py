"""Evaluation of a trained dual encoder: zero-shot classification, retrieval, linear probe.

The metric functions take tensors (embeddings and labels) and know nothing of
models or files, so they can be checked against open_clip's own helpers on the
same numbers. `runner` is the part that encodes a data set split with a model.
"""

from .linear_probe import linear_probe
from .retrieval import retrieval_metrics
from .zeroshot import zero_shot_accuracy, zero_shot_classifier

__all__ = ["linear_probe", "retrieval_metrics", "zero_shot_accuracy", "zero_shot_classifier"]
