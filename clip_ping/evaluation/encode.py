"""Embedding a split with a model: its distinct images (rows sharing an image are one) and texts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..errors import DataError


@dataclass
class SplitImages:
    """The distinct images of one split, encoded. Rows sharing a file are one image."""

    features: Tensor          # n_images x d, unit length
    rows: list[int]           # table row of each image (its first row)
    row_to_image: dict[int, int]  # every kept row -> position in ``features``
    n_decode_errors: int


def distinct_image_rows(image_ids: Sequence[str]) -> tuple[list[int], dict[int, list[int]]]:
    """First row of every distinct image, and the rows that share it."""
    first: dict[str, int] = {}
    members: dict[int, list[int]] = {}
    for row, image_id in enumerate(image_ids):
        head = first.setdefault(image_id, row)
        members.setdefault(head, []).append(row)
    return list(first.values()), members


def encode_images(
    model: torch.nn.Module,
    table: Any,
    preprocess: Callable,
    rows: Sequence[int],
    batch_size: int = 256,
    workers: int = 0,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "images",
) -> tuple[Tensor, list[int], int]:
    """Unit-length image embeddings of table ``rows``.

    Returns (features, rows that decoded, in the order of ``features``, decode errors).
    Images that fail to decode are dropped by ``collate_pairs`` and counted.
    """
    from ..data.batch_transform import split_at_batch
    from ..data.pairs import PairDataset, collate_pairs

    per_sample, finish = split_at_batch(preprocess)
    dataset = torch.utils.data.Subset(PairDataset(table, per_sample), list(rows))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=partial(collate_pairs, finish_images=finish), shuffle=False)
    features, kept, n_errors = [], [], 0
    for batch in tqdm(loader, desc=f"encode {desc}", unit="batch", disable=not progress, leave=False):
        n_errors += int(batch["n_skipped"])
        if len(batch["index"]) == 0:
            continue
        features.append(F.normalize(model.encode_image(batch["image"].to(device)).float(), dim=-1).cpu())
        kept.extend(batch["index"].tolist())
    if not features:
        raise DataError(f"no image of the {desc} could be decoded")
    return torch.cat(features), kept, n_errors


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    texts: Sequence[str],
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
) -> Tensor:
    """Unit-length text embeddings, ``batch_size`` strings at a time."""
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="encode captions", unit="batch", disable=not progress, leave=False):
        tokens = tokenizer(list(texts[start : start + batch_size]))
        if isinstance(tokens, Tensor):  # a teacher pair's "tokenizer" passes the strings through
            tokens = tokens.to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(chunks)


def encode_split_images(model, table, preprocess, rows, batch_size, workers, device, progress, desc) -> SplitImages:
    heads, members = distinct_image_rows(table.image_ids)
    wanted = set(rows) if rows is not None else None
    heads = [h for h in heads if wanted is None or h in wanted]
    features, kept, n_errors = encode_images(model, table, preprocess, heads, batch_size, workers, device, progress, desc)
    row_to_image = {row: pos for pos, head in enumerate(kept) for row in members[head]}
    return SplitImages(features, kept, row_to_image, n_errors)
