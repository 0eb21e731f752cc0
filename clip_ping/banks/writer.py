"""The work loop of stage 1: decode a chunk's images, run the teachers, write the rows, mark the chunk done.

Images are decoded and preprocessed in DataLoader worker processes while the
main process runs the image teacher on the previous batch (the two overlap).
Each chunk's captions are encoded once, in batches of captions of similar
length (less padding), when the chunk starts. Only the chunks handed in are
read: on resume, rows of finished chunks are neither read nor decoded.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.batch_transform import split_at_batch
from ..data.images import ImageDecodeError, load_image
from ..data.table import PairSource
from ..errors import ClipPingError
from ..io import atomic_write_json
from ..teachers import ImageTeacher, TextTeacher, autocast
from .format import WORK_DIR, chunk_marker

log = logging.getLogger(__name__)

_MAX_DECODE_WARNINGS = 10
# Split the teacher's transform at the batch (`split_at_batch`); False: the whole transform per sample (benchmarks).
SPLIT_TRANSFORM = True


class _ImageRows(torch.utils.data.Dataset):
    """Row i -> its image through the teacher's transform (or None) and the sha1 of its file bytes."""

    def __init__(self, table: PairSource, transform: Callable) -> None:
        self.table = table  # a CSV table or a shard table: both read image bytes by row
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            data = self.table.read_image_bytes(i)
        except OSError:
            data = b""
        # An unreadable row gets a hash no other row can have, so it joins no duplicate group.
        digest = hashlib.sha1(data).digest() if data else hashlib.sha1(f"unreadable row {i}".encode()).digest()
        try:
            image, error = self.transform(load_image(io.BytesIO(data))), None
        except ImageDecodeError as exc:
            image, error = None, f"row {i}: {exc}"
        return {"index": i, "image": image, "hash": digest, "error": error}


def _collate_rows(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ok = torch.tensor([s["image"] is not None for s in samples], dtype=torch.bool)
    images = [s["image"] for s in samples if s["image"] is not None]
    return {
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "ok": ok,
        "image": torch.stack(images) if images else None,
        "hash": torch.tensor(np.frombuffer(b"".join(s["hash"] for s in samples), np.uint8).reshape(len(samples), -1)),
        "errors": [s["error"] for s in samples if s["error"]],
    }


def chunk_batches(chunks: list[int], n: int, chunk_size: int, batch_size: int) -> Iterator[range]:
    """Row batches of the given chunks; a batch never crosses a chunk boundary."""
    for c in chunks:
        start, stop = c * chunk_size, min((c + 1) * chunk_size, n)
        for b in range(start, stop, batch_size):
            yield range(b, min(b + batch_size, stop))  # a range, not a list: millions of rows cost nothing


class _BatchList(torch.utils.data.Sampler):
    def __init__(self, batches: list[range]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[range]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def encode_captions(text_teacher: TextTeacher, captions: Sequence[str], batch_size: int) -> torch.Tensor:
    """L2-normalised features of ``captions`` (in their order), encoded in batches of similar length.

    Sorting by length before batching cuts the padding a batch of mixed lengths
    carries; the result depends only on the captions and ``batch_size``, so a
    chunk gives the same rows whether it is computed in one run or on resume.
    """
    order = sorted(range(len(captions)), key=lambda i: (len(captions[i]), i))
    out = torch.empty(len(captions), text_teacher.dim)
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        feats = text_teacher.encode([captions[i] for i in rows])
        _check_features(feats, text_teacher.dim, len(rows), "text", text_teacher.name)
        out[rows] = F.normalize(feats.float(), dim=-1)
    return out


def extract_chunks(
    out: Path,
    run: dict[str, Any],
    table: PairSource,
    image_teacher: ImageTeacher,
    text_teacher: TextTeacher,
    image_transform: Callable,
    chunks: list[int],
    workers: int,
    show_progress: bool,
    precisions: dict[str, str] | None = None,
    device: str = "cpu",
) -> None:
    """Compute and write the rows of ``chunks``; mark each chunk done once its rows are on disk.

    The teachers run in ``precisions`` (``{"image": ..., "text": ...}``, fp32 when
    not given): their ``precision`` attribute, set by the caller, and an
    `autocast` around them for teachers that wrap others.
    """
    precisions = precisions or {"image": "fp32", "text": "fp32"}
    n, chunk_size, batch_size = len(table), run["chunk_size"], run["batch_size"]
    work = out / WORK_DIR
    image_bank = np.load(out / "image.npy", mmap_mode="r+")
    text_bank = np.load(out / "text.npy", mmap_mode="r+")
    valid = np.load(out / "valid.npy", mmap_mode="r+")
    hashes = np.load(work / "image_hash.npy", mmap_mode="r+")
    dtype = image_bank.dtype

    batches = list(chunk_batches(chunks, n, chunk_size, batch_size))
    # Workers crop and keep uint8 pixels; the batch is scaled and normalised here at once (the same tensor,
    # a quarter of the bytes between processes).
    per_sample, finish = split_at_batch(image_transform, rgb_input=True) if SPLIT_TRANSFORM else (image_transform, None)
    loader = torch.utils.data.DataLoader(
        _ImageRows(table, per_sample),
        batch_sampler=_BatchList(batches),
        num_workers=workers,
        collate_fn=_collate_rows,
    )
    n_rows = sum(len(b) for b in batches)
    log.info("extracting %d rows (%d of %d chunks) in this process", n_rows, len(chunks), run["n_chunks"])
    decode_warnings = 0
    with tqdm(total=n_rows, desc="extract", unit="row", disable=not show_progress, dynamic_ncols=True) as bar:
        for batch in loader:
            index, ok = batch["index"], batch["ok"]
            start, stop = int(index[0]), int(index[-1]) + 1  # batches are contiguous row ranges
            chunk = start // chunk_size
            chunk_start, chunk_stop = chunk * chunk_size, min((chunk + 1) * chunk_size, n)
            if start == chunk_start:  # a chunk's first batch: all its captions at once
                captions = table.captions[chunk_start:chunk_stop]
                with autocast(device, precisions["text"]):
                    text_feats = encode_captions(text_teacher, captions, batch_size)
                text_bank[chunk_start:chunk_stop] = text_feats.numpy().astype(dtype)

            # Undecodable images keep an all-zero row, so rows never shift.
            image_feats = torch.zeros(len(index), image_teacher.dim)
            if batch["image"] is not None:
                images = batch["image"] if finish is None else finish(batch["image"])
                with autocast(device, precisions["image"]):
                    feats = image_teacher.encode(images)
                _check_features(feats, image_teacher.dim, int(ok.sum()), "image", image_teacher.name)
                image_feats[ok] = F.normalize(feats.float(), dim=-1)

            image_bank[start:stop] = image_feats.numpy().astype(dtype)
            valid[start:stop] = ok.numpy()
            hashes[start:stop] = batch["hash"].numpy()
            for message in batch["errors"]:
                decode_warnings += 1
                if decode_warnings <= _MAX_DECODE_WARNINGS:
                    log.warning("%s (its row keeps a zero image feature, valid=False)", message)
            bar.update(len(index))

            if stop == chunk_stop:  # the chunk's last batch
                for arr in (image_bank, text_bank, valid, hashes):
                    arr.flush()  # rows on disk first ...
                atomic_write_json(chunk_marker(work, chunk), {"rows": [chunk_start, stop]})  # ... then the marker
    if decode_warnings > _MAX_DECODE_WARNINGS:
        log.warning("%d more images could not be decoded", decode_warnings - _MAX_DECODE_WARNINGS)


def _check_features(feats: torch.Tensor, dim: int, rows: int, kind: str, name: str) -> None:
    if tuple(feats.shape) != (rows, dim):
        raise ClipPingError(f"{kind} teacher '{name}' returned shape {tuple(feats.shape)}, expected ({rows}, {dim})")
    if not torch.isfinite(feats).all():
        raise ClipPingError(f"{kind} teacher '{name}' returned non-finite features")
