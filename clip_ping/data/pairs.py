"""Image-text pairs: the PairTable (a split's rows, read once) and the PairDataset (torch).

The CSV/TSV format of a data set folder and its reader are in `clip_ping.data.csv_reader`.

Sample indices
--------------
Sample index ``i`` is the position of a row among the *kept* rows of a table,
in file order. Rows with a missing image file, an empty caption, an
undecodable caption or the wrong number of columns are skipped (counted by
reason in ``table.skipped``), so they never shift the alignment between the
table and the arrays built from it (feature banks, neighbour tables).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from PIL import Image

from ..errors import DataError
from .images import ImageDecodeError, load_image

if TYPE_CHECKING:
    from .source import PairSource

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TABLE_SUFFIXES = (".csv", ".tsv")
DEFAULT_TEMPLATES = [
    "a picture of a {}.",
    "a photo of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
]

# Skip reasons, as they appear in `PairTable.skipped` and in summaries.
SKIP_MISSING_IMAGE = "missing_image"
SKIP_EMPTY_CAPTION = "empty_caption"
SKIP_BAD_ENCODING = "bad_encoding"
SKIP_MALFORMED = "malformed_line"
SKIP_DUPLICATE = "duplicate"


# --------------------------------------------------------------------------- table


@dataclass
class PairTable:
    """The kept rows of one CSV/TSV, in file order. Row ``i`` is sample index ``i``."""

    source: Path
    root: Path
    filepaths: list[str]
    captions: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)
    source_rows: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    # File sizes seen while reading (None when files were not checked); used by fingerprint().
    file_sizes: list[int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.filepaths)

    def image_path(self, i: int) -> Path:
        return Path(self.filepaths[i])

    @property
    def image_ids(self) -> list[str]:
        """One id per row's image: rows sharing an image file share it."""
        return self.filepaths

    def open_image(self, i: int) -> Image.Image:
        """Sample i's image as RGB (raises `ImageDecodeError`); shard tables have the same method."""
        return load_image(self.filepaths[i])

    def read_image_bytes(self, i: int) -> bytes:
        """Sample i's encoded image file (raises OSError); shard tables have the same method."""
        with open(self.filepaths[i], "rb") as f:
            return f.read()

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def fingerprint(self) -> str:
        """sha256 over the kept rows (path relative to root, caption, file size).

        Cheap: no image bytes are read. A changed caption, a replaced image of
        another size, an added/removed row or a reordering all change it; moving the
        whole data folder does not.
        """
        h = hashlib.sha256()
        root = str(self.root)
        for i, path in enumerate(self.filepaths):
            if self.file_sizes is not None:
                size = self.file_sizes[i]
            else:
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = -1
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            h.update(rel.encode("utf-8", "surrogateescape"))
            h.update(b"\0")
            h.update(self.captions[i].encode("utf-8", "surrogateescape"))
            h.update(b"\0")
            h.update(str(size).encode())
            h.update(b"\n")
        return h.hexdigest()

    def subset(self, indices: Iterable[int]) -> "PairTable":
        """A new table with the given rows, re-indexed from 0 (banks built on the full table do not apply)."""
        idx = list(indices)
        return PairTable(
            source=self.source,
            root=self.root,
            filepaths=[self.filepaths[i] for i in idx],
            captions=[self.captions[i] for i in idx],
            labels={k: [v[i] for i in idx] for k, v in self.labels.items()},
            source_rows=[self.source_rows[i] for i in idx] if self.source_rows else [],
            skipped=dict(self.skipped),
            file_sizes=[self.file_sizes[i] for i in idx] if self.file_sizes is not None else None,
        )

    def summary(self) -> dict[str, Any]:
        """Counts for logs and JSON reports."""
        return {"source": str(self.source), "kept": len(self), "skipped": dict(self.skipped)}


def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """One id per distinct caption text (surrounding spaces ignored): identical captions share one."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c.strip(), len(ids)) for c in captions], dtype=torch.long)


def data_fingerprint(table: Any, kind: str = "size") -> str:
    """``table.fingerprint()`` (paths, captions, file sizes), or with ``kind="content"`` that and
    a hash of every image's bytes: it also tells apart an image replaced by another of the same size."""
    if kind == "size":
        return table.fingerprint()
    if kind != "content":
        raise ValueError(f"fingerprint kind must be size or content, got {kind!r}")
    h = hashlib.sha256(table.fingerprint().encode())
    for i in range(len(table)):
        try:
            h.update(hashlib.sha256(table.read_image_bytes(i)).digest())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()


def split_file(data_dir: str | Path, split: str) -> Path:
    """The table of one split in a data set folder: ``DIR/<split>.csv`` or ``.tsv``."""
    data_dir = Path(data_dir)
    for suffix in TABLE_SUFFIXES:
        candidate = data_dir / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    if not data_dir.is_dir():
        raise DataError(f"data set folder not found: {data_dir}")
    raise DataError(f"data set folder {data_dir} has no {split}.csv or {split}.tsv")


# --------------------------------------------------------------------------- torch


class PairDataset(torch.utils.data.Dataset):
    """Samples of a PairTable: ``{"index": i, "image": tensor, "text": caption or token row}``.

    Any table with ``captions``, ``__len__`` and ``open_image(i)`` works, e.g. the
    `clip_ping.data.shards.ShardTable` of WebDataset shards (random access).

    An image that cannot be decoded gives ``None`` (use `collate_pairs`, which drops
    it and counts it), so sample index ``i`` always stays the table's row ``i``.
    """

    def __init__(
        self,
        table: PairSource,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        view_transforms: Sequence[Callable[[Image.Image], torch.Tensor]] = (),
        caption_tokens: torch.Tensor | None = None,
    ) -> None:
        self.table = table
        self.image_transform = image_transform
        # extra augmented views of the same decoded image (``sample["views"]``), drawn after the main one
        self.view_transforms = tuple(view_transforms)
        self.tokenizer = tokenizer
        # every row's tokens, made once (`tokenize_captions`); the sample then also carries its ``caption``
        self.caption_tokens = caption_tokens
        # Counted in the process that decodes (a worker's count stays in that worker);
        # batches carry their own ``n_skipped`` for totals across workers.
        self.n_decode_errors = 0

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        i = int(i)
        try:
            image = self.table.open_image(i)
        except ImageDecodeError as exc:
            self.n_decode_errors += 1
            source_rows = getattr(self.table, "source_rows", None)  # CSV tables know their file's rows
            log.warning("sample %d (table row %d) dropped: %s", i, source_rows[i] + 1 if source_rows else i + 1, exc)
            return None
        caption = self.table.captions[i]
        text: Any = caption
        if self.caption_tokens is not None:
            text = self.caption_tokens[i]
        elif self.tokenizer is not None:
            text = self.tokenizer([text])[0]
        sample = {"index": i, "image": self.image_transform(image), "text": text}
        if self.caption_tokens is not None:
            sample["caption"] = caption
        if self.view_transforms:
            sample["views"] = [t(image) for t in self.view_transforms]
        return sample


def tokenize_captions(captions: Sequence[str], tokenizer: Callable[[list[str]], torch.Tensor],
                      batch_size: int = 1024) -> torch.Tensor:
    """Every caption's tokens (N x L), made once for a run that reads each row several times.

    The tokenizer encodes each caption on its own, so a row's tokens are the ones
    a batch of any make-up would give it.
    """
    if not captions:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([tokenizer(list(captions[start:start + batch_size]))
                      for start in range(0, len(captions), batch_size)])


def collate_pairs(
    batch: Sequence[dict[str, Any] | None],
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    finish_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Stack a list of samples, dropping the ``None`` ones (undecodable images).

    Returns ``index`` (LongTensor B), ``image`` (B x C x H x W), ``text`` (token
    tensor B x L when tokens are available or ``tokenizer`` is given, else the list
    of captions) and ``n_skipped`` (int). A batch whose samples all failed has
    ``len(index) == 0``, ``image`` an empty tensor and ``text`` an empty list.
    ``finish_images`` runs on the stacked images when they are uint8 (the batch
    half of `clip_ping.data.batch_transform.split_at_batch`).
    Module-level so DataLoader workers can pickle it; bind a tokenizer with
    ``functools.partial(collate_pairs, tokenizer=tok)``.
    """
    kept = [s for s in batch if s is not None]
    n_skipped = len(batch) - len(kept)
    if not kept:
        return {"index": torch.empty(0, dtype=torch.long), "image": torch.empty(0), "text": [], "n_skipped": n_skipped}
    index = torch.tensor([s["index"] for s in kept], dtype=torch.long)
    image = torch.stack([s["image"] for s in kept])
    if finish_images is not None and image.dtype == torch.uint8:
        image = finish_images(image)
    texts = [s["text"] for s in kept]
    if isinstance(texts[0], torch.Tensor):
        text: Any = torch.stack(texts)
    elif tokenizer is not None:
        text = tokenizer(list(texts))
    else:
        text = list(texts)
    return {"index": index, "image": image, "text": text, "n_skipped": n_skipped}
