"""Image-text pairs on disk: the PairTable (a CSV/TSV read once) and the PairDataset (torch).

Data set folder format
----------------------
A data set is a folder holding one table per split and an optional ``dataset.json``::

    DATA/
      train.csv   val.csv   test.csv        (or .tsv)
      images/...                            (anywhere; paths are relative to the CSV's folder)
      dataset.json                          (optional)

Each table has a header row. Two columns are required, the image path and the
caption (named ``filepath`` and ``caption`` by default; other names can be given,
like open_clip's ``--csv-img-key`` / ``--csv-caption-key``). Any further column
is a label column, e.g. ``shape`` or ``color``, whose values are class names.
The separator is ``,`` for ``.csv`` and a tab for ``.tsv`` unless given.

``dataset.json`` names the zero-shot classification tasks::

    {
      "name": "synth-shapes",
      "tasks": {
        "shape": {"column": "shape",
                  "classes": ["circle", "square", ...],
                  "templates": ["a picture of a {} shape.", "a drawing of a {}."]},
        ...
      }
    }

``column`` is the label column holding the class name of each row, ``classes``
lists every class (their order fixes the class ids), and ``templates`` are the
prompts, each with one ``{}`` replaced by the class name. Without
``dataset.json``, `read_dataset_info` makes one task per label column, with the
classes found in the tables and `DEFAULT_TEMPLATES`.

Sample indices
--------------
Sample index ``i`` is the position of a row among the *kept* rows of a table,
in file order. Rows with a missing image file, an empty caption, an
undecodable caption or the wrong number of columns are skipped (counted by
reason in ``table.skipped``), so they never shift the alignment between the
table and the arrays built from it (feature banks, neighbour tables).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import stat
import sys
from collections import deque
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


def _separator_for(path: Path, separator: str | None) -> str:
    if separator is not None:
        # Allow the two-character spelling "\t" from YAML files and command lines.
        return "\t" if separator in ("\\t", "tab") else separator
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _has_surrogates(text: str) -> bool:
    # Bytes that are not valid UTF-8 were read as lone surrogates (errors="surrogateescape").
    return any("\udc80" <= ch <= "\udcff" for ch in text)


MAX_RECORD_LINES = 8  # a caption may hold line breaks; a record longer than this is a quote left open


class _Lines:
    """The physical lines a `csv.reader` consumes, with their numbers, and lines to read again."""

    def __init__(self, f: Any):
        self.f, self.line_no = f, 1  # the header is line 1
        self.again: deque[tuple[int, str]] = deque()
        self.taken: list[tuple[int, str]] = []  # the lines of the current record

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        if self.again:
            number, line = self.again.popleft()
        else:
            line = next(self.f)
            self.line_no += 1
            number = self.line_no
        self.taken.append((number, line))
        return line

    def read_again(self, lines: list[tuple[int, str]]) -> None:
        self.again.extendleft(reversed(lines))


def _holds_rows(lines: list[tuple[int, str]], sep: str, n_cols: int) -> bool:
    """Whether any of these lines is a complete row on its own."""
    for _, line in lines:
        try:
            fields = next(csv.reader([line], delimiter=sep), [])
        except csv.Error:
            continue
        if len(fields) == n_cols:
            return True
    return False


def read_pairs(
    path: str | Path,
    image_key: str = "filepath",
    caption_key: str = "caption",
    label_keys: list[str] | None = None,
    separator: str | None = None,
    check_files: bool = True,
    drop_duplicates: bool = False,
) -> PairTable:
    """Read a CSV/TSV of image-text pairs; bad rows are skipped and counted, never fatal.

    ``label_keys=None`` keeps every other column as a label column; ``[]`` keeps none.
    ``check_files=False`` skips the per-row file check (faster for huge tables on slow disks);
    rows of missing files are then kept (and fail at decode time), so indices differ from a
    checked read: build banks and train with the same setting (the fingerprint tells them apart).
    ``drop_duplicates`` also skips rows whose (image path, caption) already appeared.
    Raises `DataError` when the file is missing, a required column is absent, or no row is kept.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    sep = _separator_for(path, separator)
    root = path.parent.resolve()

    # Very long captions exist in web data; the default limit (128 KiB) would make them errors.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

    filepaths: list[str] = []
    captions: list[str] = []
    sizes: list[int] | None = [] if check_files else None
    source_rows: list[int] = []
    skipped: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()

    def skip(reason: str, row_no: int, line_no: int, detail: str = "") -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        log.debug("%s line %d (row %d): skipped, %s %s", path.name, line_no, row_no, reason, detail)

    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        first_line = f.readline()
        try:
            if not first_line.strip():
                raise StopIteration
            header = next(csv.reader([first_line], delimiter=sep))
        except StopIteration:
            raise DataError(f"pairs file {path} is empty (no header row)") from None
        except csv.Error as exc:
            raise DataError(f"pairs file {path}: cannot read the header row ({exc})") from None
        header = [h.strip() for h in header]
        for key, what in ((image_key, "image"), (caption_key, "caption")):
            if key not in header:
                hint = (" (is the separator right? tab-separated tables need a .tsv suffix)"
                        if len(header) == 1 else "")
                raise DataError(
                    f"pairs file {path} has no {what} column '{key}'; columns are: {', '.join(header)}{hint}"
                )
        if label_keys is None:
            label_keys = [h for h in header if h not in (image_key, caption_key) and h]
        missing = [k for k in label_keys if k not in header]
        if missing:
            raise DataError(f"pairs file {path} has no label column(s) {', '.join(missing)}; columns are: {', '.join(header)}")
        img_col, cap_col = header.index(image_key), header.index(caption_key)
        label_cols = {k: header.index(k) for k in label_keys}
        labels: dict[str, list[str]] = {k: [] for k in label_keys}
        n_cols = len(header)
        lines = _Lines(f)
        reader = csv.reader(lines, delimiter=sep)

        row_no = -1
        while True:
            lines.taken = []
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                row_no += 1
                skip(SKIP_MALFORMED, row_no, lines.taken[0][0] if lines.taken else lines.line_no, str(exc))
                continue
            row_no += 1
            line_no = lines.taken[0][0]
            if len(lines.taken) > 1 and (len(lines.taken) > MAX_RECORD_LINES
                                         or _holds_rows(lines.taken[1:], sep, n_cols)):
                # A quote left open swallowed the lines after it: this record is malformed, and
                # the swallowed lines are rows of their own, read again so nothing shifts.
                skip(SKIP_MALFORMED, row_no, line_no, "a quote opened and never closed")
                lines.read_again(lines.taken[1:])
                continue
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line: not a row at all
            if len(row) != n_cols:
                skip(SKIP_MALFORMED, row_no, line_no, f"{len(row)} columns instead of {n_cols}")
                continue
            caption = row[cap_col].strip()
            rel = row[img_col].strip()
            if _has_surrogates(caption) or _has_surrogates(rel):
                skip(SKIP_BAD_ENCODING, row_no, line_no)
                continue
            if not caption:
                skip(SKIP_EMPTY_CAPTION, row_no, line_no)
                continue
            if not rel:
                skip(SKIP_MISSING_IMAGE, row_no, line_no, "(empty path)")
                continue
            full = os.path.normpath(os.path.join(root, os.path.expanduser(rel)))
            if sizes is not None:
                try:
                    st = os.stat(full)
                except OSError:
                    skip(SKIP_MISSING_IMAGE, row_no, line_no, full)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    skip(SKIP_MISSING_IMAGE, row_no, line_no, f"{full} is not a file")
                    continue
            if drop_duplicates:
                pair = (full, caption)
                if pair in seen:
                    skip(SKIP_DUPLICATE, row_no, line_no)
                    continue
                seen.add(pair)
            filepaths.append(full)
            captions.append(caption)
            if sizes is not None:
                sizes.append(st.st_size)
            source_rows.append(row_no)
            for k, col in label_cols.items():
                labels[k].append(row[col].strip())

    if skipped:
        reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(skipped.items()))
        log.warning("%s: kept %d rows, skipped %d (%s)", path, len(filepaths), sum(skipped.values()), reasons)
    if not filepaths:
        why = f" (skipped: {', '.join(f'{n} {r}' for r, n in skipped.items())})" if skipped else ""
        raise DataError(f"pairs file {path} has no usable rows{why}")
    return PairTable(
        source=path.resolve(),
        root=root,
        filepaths=filepaths,
        captions=captions,
        labels=labels,
        source_rows=source_rows,
        skipped=skipped,
        file_sizes=sizes,
    )


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
    ) -> None:
        self.table = table
        self.image_transform = image_transform
        # extra augmented views of the same decoded image (``sample["views"]``), drawn after the main one
        self.view_transforms = tuple(view_transforms)
        self.tokenizer = tokenizer
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
        text: Any = self.table.captions[i]
        if self.tokenizer is not None:
            text = self.tokenizer([text])[0]
        sample = {"index": i, "image": self.image_transform(image), "text": text}
        if self.view_transforms:
            sample["views"] = [t(image) for t in self.view_transforms]
        return sample


def collate_pairs(
    batch: Sequence[dict[str, Any] | None],
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Stack a list of samples, dropping the ``None`` ones (undecodable images).

    Returns ``index`` (LongTensor B), ``image`` (B x C x H x W), ``text`` (token
    tensor B x L when tokens are available or ``tokenizer`` is given, else the list
    of captions) and ``n_skipped`` (int). A batch whose samples all failed has
    ``len(index) == 0``, ``image`` an empty tensor and ``text`` an empty list.
    Module-level so DataLoader workers can pickle it; bind a tokenizer with
    ``functools.partial(collate_pairs, tokenizer=tok)``.
    """
    kept = [s for s in batch if s is not None]
    n_skipped = len(batch) - len(kept)
    if not kept:
        return {"index": torch.empty(0, dtype=torch.long), "image": torch.empty(0), "text": [], "n_skipped": n_skipped}
    index = torch.tensor([s["index"] for s in kept], dtype=torch.long)
    image = torch.stack([s["image"] for s in kept])
    texts = [s["text"] for s in kept]
    if isinstance(texts[0], torch.Tensor):
        text: Any = torch.stack(texts)
    elif tokenizer is not None:
        text = tokenizer(list(texts))
    else:
        text = list(texts)
    return {"index": index, "image": image, "text": text, "n_skipped": n_skipped}
