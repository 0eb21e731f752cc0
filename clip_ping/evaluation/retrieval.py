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

Identical caption texts (``text_ids``: the same id for the same text) are one
text, as several captions of one image are: the gallery of image-to-text holds
each distinct text once and any image with that text is correct for it, and
each distinct text is one text-to-image query, a hit on any of its images
counting. Without this rule a caption shared by many images ranks by how ties
happen to fall, which says nothing about the model.

`retrieval_metrics_per_row` is the other definition in use (clip_benchmark's):
every caption row is its own query and gallery item, and a hit is a correct
item among the ``k`` indices ``torch.topk`` returns (ties fall as the sort
orders them). It is reported beside the first so figures compare with
published ones.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.pairs import caption_ids  # noqa: F401  (re-exported: evaluation's name for it)


def _summary(ranks0: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """R@k (%), mean and median rank from 0-based ranks."""
    r = ranks0.double().numpy()
    out = {f"R@{k}": 100.0 * int(np.sum(r < k)) / len(r) for k in ks}
    out["mean_rank"] = float(r.mean()) + 1.0
    out["median_rank"] = float(math.floor(np.median(r))) + 1.0
    return out


def _ranks(queries: Tensor, gallery: Tensor, query_of_pair: Tensor, item_of_pair: Tensor,
           chunk_size: int) -> Tensor:
    """0-based rank of each query's best correct item: the wrong items scoring at least as high.

    ``(query_of_pair[p], item_of_pair[p])`` are the correct (query, item) pairs,
    sorted by query; every query has at least one.
    """
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        sims = queries[start : start + chunk_size] @ gallery.T
        lo, hi = torch.searchsorted(query_of_pair, torch.tensor([start, start + sims.shape[0]]))
        own = torch.zeros_like(sims, dtype=torch.bool)
        own[query_of_pair[lo:hi] - start, item_of_pair[lo:hi]] = True
        best_own = sims.masked_fill(~own, float("-inf")).max(dim=1).values
        ranks.append(((sims >= best_own[:, None]) & ~own).sum(dim=1))
    return torch.cat(ranks)


def _pairs(query: Tensor, item: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct (query, item) pairs sorted by query."""
    pairs = torch.unique(torch.stack([query, item], dim=1), dim=0)  # sorted lexicographically
    return pairs[:, 0].contiguous(), pairs[:, 1].contiguous()


def _checked_inputs(image_features: Tensor, text_features: Tensor, text_to_image: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor]:
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
    return images, texts, text_to_image


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    text_ids: Tensor | None = None,
) -> dict:
    """Retrieval metrics of N images and M captions (features need not be normalised).

    ``text_to_image`` (LongTensor M) maps each caption to its image; ``None`` means
    one caption per image, caption ``i`` belonging to image ``i``. ``text_ids``
    (LongTensor M, optional) gives identical caption texts the same id; they then
    count as one text (module docstring).
    Returns ``{"image_to_text": {"R@1", "R@5", "R@10", "mean_rank", "median_rank"},
    "text_to_image": {...}, "n_images": N, "n_texts": M, "n_distinct_texts": T}``.
    Similarities are computed ``chunk_size`` queries at a time, so memory stays
    ``chunk_size x max(N, M)``.
    """
    images, texts, text_to_image = _checked_inputs(image_features, text_features, text_to_image)
    n_images, n_texts = images.shape[0], texts.shape[0]
    if text_ids is None:
        text_of_caption = torch.arange(n_texts)
        distinct = texts
    else:
        text_ids = text_ids.long().cpu().reshape(-1)
        if text_ids.shape[0] != n_texts:
            raise ValueError(f"text_ids has {text_ids.shape[0]} entries for {n_texts} captions")
        unique, text_of_caption = torch.unique(text_ids, return_inverse=True)
        first = torch.full((len(unique),), n_texts, dtype=torch.long).scatter_reduce(
            0, text_of_caption, torch.arange(n_texts), reduce="amin")
        distinct = texts[first]  # identical texts have identical embeddings: one stands for all
    # image -> text: the gallery is the distinct texts; an image's own texts are those of its captions
    i2t = _ranks(images, distinct, *_pairs(text_to_image, text_of_caption), chunk_size)
    # text -> image: one query per distinct text; any image carrying that text is correct
    t2i = _ranks(distinct, images, *_pairs(text_of_caption, text_to_image), chunk_size)
    return {
        "image_to_text": _summary(i2t, ks),
        "text_to_image": _summary(t2i, ks),
        "n_images": n_images,
        "n_texts": n_texts,
        "n_distinct_texts": int(distinct.shape[0]),
    }


def retrieval_metrics_per_row(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """clip_benchmark's definition: every caption row is a query and a gallery item; a query is a
    hit at k when a correct item is among the k indices of ``torch.topk`` (ties as the sort falls).
    Returns ``{"image_to_text": {"R@k"}, "text_to_image": {"R@k"}}`` in %."""
    images, texts, text_to_image = _checked_inputs(image_features, text_features, text_to_image)
    scores = texts @ images.T  # M x N
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(texts.shape[0]), text_to_image] = True

    def recall(s: Tensor, pos: Tensor, k: int) -> float:
        top = s.topk(min(k, s.shape[1]), dim=1).indices
        return 100.0 * float(pos.gather(1, top).any(dim=1).double().mean())

    return {"text_to_image": {f"R@{k}": recall(scores, positive, k) for k in ks},
            "image_to_text": {f"R@{k}": recall(scores.T, positive.T, k) for k in ks}}
