"""Reading a CSV/TSV table of image-text pairs into a `PairTable`: the one CSV reader of clip-ping.

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

``dataset.json`` (zero-shot tasks) is read by `clip_ping.data.dataset_info`.
"""

from __future__ import annotations

import csv
import logging
import os
import stat
import sys
from collections import deque
from pathlib import Path
from typing import Any

from ..errors import DataError
from .pairs import (
    SKIP_BAD_ENCODING,
    SKIP_DUPLICATE,
    SKIP_EMPTY_CAPTION,
    SKIP_MALFORMED,
    SKIP_MISSING_IMAGE,
    PairTable,
)

log = logging.getLogger(__name__)


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
