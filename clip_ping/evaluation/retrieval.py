"""Image-to-text and text-to-image retrieval: recall at k and rank statistics.

Definitions follow open_clip's ``get_clip_metrics``: a query's rank is the
position (1 = first) of its first correct item when all items are sorted by
cosine similarity; R@k is the share of queries with rank <= k (here in %);
mean rank is the mean rank, median rank is ``floor(median(rank - 1)) + 1``.

Several captions per image are supported: ``text_to_image[j]`` is the image of
caption ``j``. An image query is a hit at k when *any* of its captions is in the
top k. Ties are counted against the query (a wrong item scoring exactly as
high as the right one ranks before it), so a collapsed model whose embeddings
are all equal scores worst, not best.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _summary(ranks0: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """R@k (%), mean and median rank from 0-based ranks."""
    r = ranks0.double().numpy()
    out = {f"R@{k}": 100.0 * int(np.sum(r < k)) / len(r) for k in ks}
    out["mean_rank"] = float(r.mean()) + 1.0
    out["median_rank"] = float(math.floor(np.median(r))) + 1.0
    return out


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict:
    """Retrieval metrics of N images and M captions (features need not be normalised).

    ``text_to_image`` (LongTensor M) maps each caption to its image; ``None`` means
    one caption per image, caption ``i`` belonging to image ``i``.
    Returns ``{"image_to_text": {"R@1", "R@5", "R@10", "mean_rank", "median_rank"},
    "text_to_image": {...}, "n_images": N, "n_texts": M}``.
    Similarities are computed ``chunk_size`` queries at a time, so memory stays
    ``chunk_size x max(N, M)``.
    """
    images = F.normalize(image_features.detach().float().cpu(), dim=-1)
    texts = F.normalize(text_features.detach().float().cpu(), dim=-1)
    n_images, n_texts = images.shape[0], texts.shape[0]
    if text_to_image is None:
        if n_images != n_texts:
            raise ValueError(f"{n_images} images and {n_texts} captions: pass text_to_image")
        text_to_image = torch.arange(n_texts)
    text_to_image = text_to_image.long().cpu().reshape(-1)
    if text_to_image.shape[0] != n_texts:
        raise ValueError(f"text_to_image has {text_to_image.shape[0]} entries for {n_texts} captions")
    if n_texts and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        raise ValueError("text_to_image holds an index outside the images")
    captions_per_image = torch.bincount(text_to_image, minlength=n_images)
    if (captions_per_image == 0).any():
        raise ValueError(f"{int((captions_per_image == 0).sum())} image(s) have no caption")
    # NaN compares false everywhere and would silently give rank 1.
    if not (torch.isfinite(images).all() and torch.isfinite(texts).all()):
        raise ValueError("features contain NaN or infinite values")

    # Text -> image: rank of the caption's own image among all images.
    t2i_ranks = []
    for start in range(0, n_texts, chunk_size):
        sims = texts[start : start + chunk_size] @ images.T  # m x N
        own = text_to_image[start : start + chunk_size]
        positive = sims.gather(1, own[:, None])
        t2i_ranks.append((sims >= positive).sum(dim=1) - 1)  # minus the image itself

    # Image -> text: rank of the best-scoring of the image's captions, counting wrong captions only.
    i2t_ranks = []
    for start in range(0, n_images, chunk_size):
        sims = images[start : start + chunk_size] @ texts.T  # n x M
        ids = torch.arange(start, start + sims.shape[0])
        is_own = text_to_image[None, :] == ids[:, None]
        best_own = sims.masked_fill(~is_own, float("-inf")).max(dim=1).values
        i2t_ranks.append(((sims >= best_own[:, None]) & ~is_own).sum(dim=1))

    return {
        "image_to_text": _summary(torch.cat(i2t_ranks), ks),
        "text_to_image": _summary(torch.cat(t2i_ranks), ks),
        "n_images": n_images,
        "n_texts": n_texts,
    }
