"""Decoded images kept in memory, so a small data set is decoded once per run, not once per epoch.

`DecodedImages` wraps any table (`PairSource`). After `fill`, ``open_image(i)``
gives row i's RGB pixels from one packed uint8 buffer: the very pixels the
table's own decoder gives, so a run computes the same with or without the cache
and resumes the same way. A row that could not be decoded keeps its error and
is skipped and counted as before. Everything else is the table's.

The augmentation still runs per sample in the loader workers; only the decode
(and the file read) is saved. One buffer rather than one array per image keeps
forked workers from copying pages as they touch Python objects.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .images import ImageDecodeError
from .order import ignore_stop_signals
from .source import PairSource

log = logging.getLogger(__name__)

CACHE_SETTINGS = ("auto", "on", "off")
GIB = 1024 ** 3
ESTIMATE_ROWS = 32  # rows decoded to estimate the cache's size


class _Decode(Dataset):
    """Row i -> (i, H x W x 3 uint8 tensor, None) or (i, None, the decode error's message)."""

    def __init__(self, table: PairSource) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            # a writable copy as a tensor: `_pack` joins a worker's rows into one tensor, sent through shared memory
            return i, torch.from_numpy(np.array(self.table.open_image(i), dtype=np.uint8)), None
        except ImageDecodeError as exc:
            return i, None, str(exc)


FILL_BATCH = 64  # rows per message from a decoding worker: one message per image costs more than its decode


def _pack(rows: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    """A worker's rows as one flat tensor (one shared-memory transfer) with their indices, shapes and errors."""
    kept = [(i, pixels) for i, pixels, _ in rows if pixels is not None]
    return {"index": [i for i, _ in kept], "shape": [tuple(p.shape[:2]) for _, p in kept],
            "pixels": torch.cat([p.reshape(-1) for _, p in kept]) if kept else torch.empty(0, dtype=torch.uint8),
            "errors": {i: error for i, _, error in rows if error is not None}}


class DecodedImages:
    """A table whose images, once `fill`-ed, come from memory; before that, from the table."""

    def __init__(self, table: PairSource) -> None:
        self.table = table
        self._pixels: torch.Tensor | None = None  # every image's bytes, one after the other
        self._offsets = torch.empty(0, dtype=torch.long)
        self._shapes = torch.empty(0, 2, dtype=torch.long)  # (height, width) per row
        self._errors: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "table":  # not set yet (while unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.table, name)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def filled(self) -> bool:
        return self._pixels is not None

    @property
    def nbytes(self) -> int:
        return 0 if self._pixels is None else self._pixels.numel()

    def open_image(self, i: int) -> Image.Image:
        if self._pixels is None:
            return self.table.open_image(i)
        if i in self._errors:
            raise ImageDecodeError(self._errors[i])
        height, width = self._shapes[i].tolist()
        start = int(self._offsets[i])
        pixels = self._pixels[start:start + height * width * 3].view(height, width, 3).numpy()
        return Image.fromarray(pixels)  # PIL copies: RGB is 4 bytes per pixel inside PIL

    def estimated_bytes(self) -> int:
        """The cache's size, from the decoded size of up to 32 rows spread over the table."""
        n = len(self.table)
        if n == 0:
            return 0
        rows = np.unique(np.linspace(0, n - 1, min(n, ESTIMATE_ROWS)).astype(int))
        sizes = []
        for i in rows.tolist():
            try:
                width, height = self.table.open_image(i).size
            except ImageDecodeError:
                continue
            sizes.append(width * height * 3)
        return int(np.mean(sizes) * n) if sizes else 0

    def fill(self, workers: int = 2, progress: bool = False, max_bytes: int | None = None) -> bool:
        """Decode every row once (in ``workers`` processes) and keep the pixels.

        Returns False, leaving the cache empty, when the pixels would exceed
        ``max_bytes``. While the buffer is packed, memory peaks at about twice its size.
        """
        loader = DataLoader(_Decode(self.table), batch_size=FILL_BATCH, num_workers=workers, collate_fn=_pack,
                            worker_init_fn=ignore_stop_signals if workers else None)
        arrays: list[torch.Tensor | None] = [None] * len(self.table)
        errors: dict[int, str] = {}
        total = 0
        with tqdm(total=len(self.table), desc="decoding images into memory", unit="img", disable=not progress) as bar:
            for part in loader:
                errors.update(part["errors"])
                total += part["pixels"].numel()
                if max_bytes is not None and total > max_bytes:
                    log.info("image cache: the decoded images pass %.2f GiB after %d of %d rows; reading from disk",
                             max_bytes / GIB, bar.n + len(part["index"]) + len(part["errors"]), len(self.table))
                    return False
                start = 0
                for i, (height, width) in zip(part["index"], part["shape"]):
                    size = height * width * 3
                    arrays[i] = part["pixels"][start:start + size].view(height, width, 3)
                    start += size
                bar.update(len(part["index"]) + len(part["errors"]))
        shapes = torch.tensor([a.shape[:2] if a is not None else (0, 0) for a in arrays], dtype=torch.long)
        sizes = shapes[:, 0] * shapes[:, 1] * 3
        self._offsets = torch.cumsum(sizes, 0) - sizes
        self._pixels = torch.cat([a.reshape(-1) for a in arrays if a is not None]
                                 or [torch.empty(0, dtype=torch.uint8)])
        self._shapes, self._errors = shapes, errors
        return True


def cache_decision(setting: str, table: PairSource, reads_per_image: float, max_gb: float) -> tuple[bool, str]:
    """Whether a run caches its decoded images, and why (for the log).

    ``auto`` caches when each image is read at least twice and the estimate fits
    ``max_gb``; ``on`` always (up to ``max_gb``); ``off`` never.
    """
    if setting == "off":
        return False, "--image-cache off"
    if setting == "on":
        return True, "--image-cache on"
    if reads_per_image < 2:
        return False, f"each image is read {reads_per_image:.1f} times in this run"
    estimate = DecodedImages(table).estimated_bytes()
    if estimate > max_gb * GIB:
        return False, f"the decoded images would take ~{estimate / GIB:.1f} GiB, more than --image-cache-gb {max_gb:g}"
    return True, f"~{estimate / GIB:.2f} GiB for {len(table)} images read {reads_per_image:.1f} times each"
