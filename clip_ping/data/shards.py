"""WebDataset tar shards: writing, indexing once, random access and streaming, and `convert`.

Shard layout
------------
A split stored as shards is a folder holding the tar files and two small index files::

    OUT/train-000000.tar  train-000001.tar ...
    OUT/train.shards.json      descriptor: shard list (name, samples, bytes), count, labels, fingerprint,
                               and where each array of the index file lies
    OUT/train.index.bin        one entry per sample, in sample-index order, as arrays
                               (`shard_index`): key, shard, offset, size, ext, caption,
                               label columns, and the key -> index map; memory-mapped on open

Inside a tar, the files of one sample share a key (WebDataset convention: the
name up to the first dot): ``<key>.png`` (or jpg / jpeg / webp ...) and
``<key>.txt`` (the caption) and optionally ``<key>.json`` (``{"labels": {...}}``,
or a JSON object whose ``caption``/``text`` field is the caption when there is
no ``.txt``).

Stable sample indices
---------------------
The index is the key -> index map, written once by `index_shards` (shards
written by `write_shards` are indexed right away; shards made by other tools,
e.g. img2dataset, are indexed on first use). Sample index ``i`` is row ``i`` of
the index: the order of the shards in the descriptor, then of the members in
each tar. Every reader (random access, or streaming in any order, with any
number of workers and processes) maps a sample's key back to that index, so
feature banks and neighbour tables stay aligned. Samples without an image or
with an empty caption are left out of the index (counted by reason). A shard
changed since it was indexed (its size, or its member table when its modification
time changed: `shard_index.check_shard`) is refused when the split is opened.

Readers
-------
* `ShardTable` (from `open_shards`): like `PairTable` (``captions``, ``labels``,
  ``fingerprint()``, ``open_image(i)``), reading an image by seeking to its
  offset in the tar; so `PairDataset` works on it unchanged.
* `ShardStream`: an IterableDataset that streams the tars sequentially with the
  ``webdataset`` library (shards split over processes and loader workers,
  optional shuffle buffer), for data sets larger than memory or the disk cache.
  Its samples have the same form as `PairDataset`'s, so `collate_pairs` batches them.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import tarfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import DataError
from .images import load_image
from .pairs import (
    SKIP_BAD_ENCODING,
    SKIP_EMPTY_CAPTION,
    SKIP_MISSING_IMAGE,
)
from .shard_index import (
    CodedColumn,
    KeyIndex,
    StringColumn,
    check_end_rows,
    check_shards_unchanged,
    member_table_digest,
    read_csv_index,
    read_index,
    reindex_hint,
    rows_fingerprint,
    split_name,
    write_index,
)

log = logging.getLogger(__name__)

FORMAT = "clip-ping-shards/2"
FORMAT_V1 = "clip-ping-shards/1"  # CSV index, still read
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
CAPTION_FIELDS = ("caption", "text", "txt")
SKIP_DUPLICATE_KEY = "duplicate_key"
SKIP_CORRUPT_SHARD = "corrupt_shard_tail"

# --------------------------------------------------------------------------- table


@dataclass
class ShardTable:
    """The indexed samples of one split stored as tar shards. Row ``i`` is sample index ``i``."""

    source: Path  # the <split>.shards.json descriptor
    root: Path  # folder the shard names are relative to
    shards: list[str]
    shard_bytes: list[int]
    keys: StringColumn
    captions: StringColumn
    labels: dict[str, StringColumn]
    shard_ids: np.ndarray  # int32, which shard holds sample i
    offsets: np.ndarray  # int64, byte offset of the image data in that tar
    sizes: np.ndarray  # int64, image bytes
    exts: CodedColumn  # image extension per sample (png, jpg, ...)
    skipped: dict[str, int] = field(default_factory=dict)
    _key_index: KeyIndex | None = field(default=None, repr=False)
    _fds: dict[int, int] = field(default_factory=dict, repr=False)
    _pid: int = field(default=-1, repr=False)
    _mapped: bool = field(default=False, repr=False)  # arrays memory-mapped from the index file
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def shard_path(self, j: int) -> Path:
        return self.root / self.shards[j]

    @property
    def key_to_index(self) -> KeyIndex:
        """Key -> sample index (``.get(key)``), built once; loader workers forked later share it."""
        if self._key_index is None:
            self._key_index = KeyIndex(self.keys)
        return self._key_index

    def fingerprint(self) -> str:
        """sha256 over the samples (key, caption, image size), like `PairTable.fingerprint`; computed
        once per table (its rows never change), so later calls (each checkpoint's check) cost nothing."""
        if self._fingerprint is None:
            self._fingerprint = rows_fingerprint(self.keys, self.captions, self.sizes)
        return self._fingerprint

    def read_image_bytes(self, i: int) -> bytes:
        # os.pread needs no shared file position, so one descriptor per process is safe
        # with DataLoader workers; descriptors inherited through fork are reopened.
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        j = int(self.shard_ids[i])
        fd = self._fds.get(j)
        if fd is None:
            fd = self._fds[j] = os.open(self.shard_path(j), os.O_RDONLY)
        return os.pread(fd, int(self.sizes[i]), int(self.offsets[i]))

    def open_image(self, i: int) -> Image.Image:
        """Sample i's image as RGB (raises `ImageDecodeError`)."""
        return load_image(self.read_image_bytes(i), f"{self.shards[int(self.shard_ids[i])]}:{self.keys[i]}")

    @property
    def image_ids(self) -> StringColumn:
        """One id per row's image (keys are unique in an index, so no two rows share one)."""
        return self.keys

    def summary(self) -> dict[str, Any]:
        return {"source": str(self.source), "kept": len(self), "skipped": dict(self.skipped), "shards": len(self.shards)}

    def __getstate__(self) -> dict[str, Any]:
        # File descriptors do not travel to other processes; a memory-mapped index is
        # mapped again there (spawned workers share the page cache instead of a copy).
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        if self._mapped:
            for name in ("keys", "captions", "labels", "shard_ids", "offsets", "sizes", "exts", "_key_index"):
                del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._mapped:
            other = open_shards(self.source, check_shards=False)
            for name in ("keys", "captions", "labels", "shard_ids", "offsets", "sizes", "exts", "_key_index"):
                setattr(self, name, getattr(other, name))


# --------------------------------------------------------------------------- indexing


def _decode_text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


@dataclass
class _ShardScan:
    """What one tar holds: its samples in member order, and the members left out."""

    samples: list[tuple[str, str, dict[str, str], int, int, str]]  # key, caption, labels, offset, size, ext
    skipped: dict[str, int]
    bytes: int
    mtime_ns: int
    members: str  # `member_table_digest`


def _scan_shard(path: Path, label_fields: Sequence[str] = ()) -> _ShardScan:
    """Read one tar's headers and small caption / JSON members (never image bytes).

    Labels are the JSON's ``labels`` object, plus the top-level fields named in
    ``label_fields`` (img2dataset's JSON holds url, status, sizes...: not labels by default).
    """
    samples: list[tuple[str, str, dict[str, str], int, int, str]] = []
    skipped: dict[str, int] = {}
    st = path.stat()
    size = st.st_size

    def count(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    def finish(sample: dict[str, Any] | None) -> None:
        if sample is None:
            return
        if "image" not in sample:
            count(SKIP_MISSING_IMAGE)
            return
        caption = sample.get("txt")
        labels: dict[str, str] = {}
        meta = sample.get("json")
        if isinstance(meta, dict):
            if caption is None:
                caption = next((meta[f].strip() for f in CAPTION_FIELDS if isinstance(meta.get(f), str)), None)
            raw = dict(meta["labels"]) if isinstance(meta.get("labels"), dict) else {}
            raw.update({f: meta[f] for f in label_fields if isinstance(meta.get(f), (str, int, float, bool))})
            labels = {str(k): str(v).strip() for k, v in raw.items()}
        if sample.get("bad_text"):
            count(SKIP_BAD_ENCODING)
        elif not caption:
            count(SKIP_EMPTY_CAPTION)
        else:
            samples.append((sample["key"], caption, labels, *sample["image"]))

    sample: dict[str, Any] | None = None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if sample is None or sample["key"] != key:
                    finish(sample)
                    sample = {"key": key}
                last = ext.rsplit(".", 1)[-1]
                if last in IMAGE_EXTS and "image" not in sample:
                    if member.offset_data + member.size > size:
                        raise EOFError(f"member {member.name} runs past the end of the file")
                    sample["image"] = (member.offset_data, member.size, last)
                elif last in ("txt", "json"):
                    text = _decode_text(tar.extractfile(member).read())  # type: ignore[union-attr]
                    if text is None:
                        sample["bad_text"] = True
                    elif last == "txt":
                        sample["txt"] = text
                    else:
                        try:
                            sample["json"] = json.loads(text) if text else None
                        except json.JSONDecodeError:
                            sample["json"] = None
    except (tarfile.TarError, OSError, EOFError) as exc:
        # A truncated tar keeps the complete samples read before the damage.
        log.warning("shard %s is damaged after %d samples (%s)", path, len(samples), exc)
        count(SKIP_CORRUPT_SHARD)
        sample = None
    finish(sample)
    # the member table in a pass of its own over the headers (cheap: one read a member, no data)
    return _ShardScan(samples, skipped, size, st.st_mtime_ns, member_table_digest(path))


def index_shards(shards: list[Path], descriptor: str | Path, split: str = "train", label_fields: Sequence[str] = (),
                 workers: int = 0, progress: bool = False) -> ShardTable:
    """Scan tar shards once and write the key -> index map (``<split>.index.bin``) and descriptor.

    Reads tar headers and the small caption / JSON members only, never image bytes;
    ``workers`` processes scan shards in parallel (the index keeps the shards' order).
    ``label_fields``: top-level JSON fields kept as label columns beside a ``labels`` object.
    """
    descriptor = Path(descriptor)
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    root = descriptor.parent.resolve()
    paths = [Path(p).resolve() for p in shards]
    keys: list[str] = []
    captions: list[str] = []
    label_rows: list[dict[str, str]] = []
    shard_ids: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    exts: list[str] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    shard_bytes: list[int] = []
    shard_marks: list[dict[str, Any]] = []  # modification time and member table of each shard
    per_shard: list[int] = []
    scan = partial(_scan_shard, label_fields=tuple(label_fields))
    # spawn, not fork: a fork of a process running torch threads can hang on a lock they held
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 and len(paths) > 1 else None
    try:
        scans = pool.imap(scan, paths) if pool is not None else map(scan, paths)
        for j, result in enumerate(tqdm(scans, total=len(paths), desc="index shards", unit="shard", disable=not progress)):
            shard_bytes.append(result.bytes)
            shard_marks.append({"mtime_ns": result.mtime_ns, "members": result.members})
            per_shard.append(0)
            for reason, n in result.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
            for key, caption, labels, offset, size, ext in result.samples:
                if key in seen:
                    skipped[SKIP_DUPLICATE_KEY] = skipped.get(SKIP_DUPLICATE_KEY, 0) + 1
                    continue
                seen.add(key)
                keys.append(key)
                captions.append(caption)
                label_rows.append(labels)
                shard_ids.append(j)
                offsets.append(offset)
                sizes.append(size)
                exts.append(ext)
                per_shard[j] += 1
    finally:
        if pool is not None:
            pool.close()
    del seen

    if not keys:
        raise DataError(f"no usable samples in the {len(shards)} shard(s) given (skipped: {skipped or 'none'})")
    columns = sorted({k for row in label_rows for k in row})
    n = len(keys)
    table = ShardTable(
        source=descriptor.resolve(),
        root=root,
        shards=[os.path.relpath(p, root) for p in paths],
        shard_bytes=shard_bytes,
        keys=StringColumn.from_strings(keys),
        captions=StringColumn.from_strings(captions),
        labels={c: StringColumn.from_strings([row.get(c, "") for row in label_rows]) for c in columns},
        shard_ids=np.asarray(shard_ids, dtype=np.int32),
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
        exts=CodedColumn.from_strings(exts),
        skipped=skipped,
    )
    del keys, captions, label_rows, exts
    _save_index(table, split, per_shard, shard_marks)
    if skipped:
        log.warning("%s: indexed %d samples, skipped %s", descriptor, n, skipped)
    return table


def _index_path(descriptor: Path, split: str) -> Path:
    return descriptor.parent / f"{split}.index.bin"


def _save_index(table: ShardTable, split: str, per_shard: list[int], shard_marks: list[dict[str, Any]]) -> None:
    """Write the index file (format 2) and then the descriptor that says where its arrays lie."""
    index_path = _index_path(table.source, split)
    key_index = table.key_to_index
    arrays = {"keys.data": table.keys.data, "keys.ends": table.keys.ends,
              "captions.data": table.captions.data, "captions.ends": table.captions.ends,
              "shard_ids": table.shard_ids, "offsets": table.offsets, "sizes": table.sizes, "exts": table.exts.codes,
              "key_hashes": key_index._sorted, "key_order": key_index._order}
    for c, column in table.labels.items():
        arrays[f"label.{c}.data"], arrays[f"label.{c}.ends"] = column.data, column.ends
    layout = write_index(index_path, arrays)
    info = {
        "format": FORMAT,
        "split": split,
        "count": len(table),
        "index": index_path.name,
        "index_bytes": index_path.stat().st_size,
        "arrays": layout,
        "exts": table.exts.names,
        "labels": list(table.labels),
        "fingerprint": table.fingerprint(),
        "skipped": table.skipped,
        "shards": [
            {"name": name, "samples": n, "bytes": b, **marks}
            for name, n, b, marks in zip(table.shards, per_shard, table.shard_bytes, shard_marks)
        ],
    }
    table.source.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def open_shards(descriptor: str | Path, check_shards: bool = True) -> ShardTable:
    """Load an indexed split (``<split>.shards.json``); refuses shards changed since indexing.

    A format-2 index is memory-mapped (nothing is read up front); a format-1 (CSV) index
    is read into the same compact columns.
    """
    descriptor = Path(descriptor)
    if descriptor.is_dir():
        descriptor = descriptor / "train.shards.json"
    if not descriptor.is_file():
        raise DataError(f"shard descriptor not found: {descriptor} (index tar shards with clip-ping data convert)")
    try:
        info = json.loads(descriptor.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{descriptor} is not valid JSON: {exc}") from None
    fmt = info.get("format") if isinstance(info, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith("clip-ping-shards/")):
        raise DataError(f"{descriptor} is not a clip-ping shard descriptor (format {fmt!r})")
    if fmt not in (FORMAT, FORMAT_V1):
        raise DataError(f"{descriptor} has index format {fmt!r}, which this version cannot read "
                        f"(it reads {FORMAT_V1} and {FORMAT}); re-index with clip-ping data convert --to index")
    root = descriptor.parent.resolve()
    if check_shards:
        check_shards_unchanged(descriptor, root, info)
    index_path = root / info["index"]
    columns = list(info.get("labels", []))
    if fmt == FORMAT_V1:
        parts, key_index, mapped = read_csv_index(index_path, columns), None, False
    else:
        if index_path.is_file() and index_path.stat().st_size != info.get("index_bytes"):
            raise DataError(f"{index_path} does not match {descriptor} (written by another indexing); re-index it")
        a = read_index(index_path, info["arrays"])
        keys = StringColumn(a["keys.data"], a["keys.ends"])
        parts = {"keys": keys, "captions": StringColumn(a["captions.data"], a["captions.ends"]),
                 "labels": {c: StringColumn(a[f"label.{c}.data"], a[f"label.{c}.ends"]) for c in columns},
                 "shard_ids": a["shard_ids"], "offsets": a["offsets"], "sizes": a["sizes"],
                 "exts": CodedColumn(a["exts"], info["exts"])}
        key_index, mapped = KeyIndex(keys, a["key_hashes"], a["key_order"]), True
    if len(parts["keys"]) != info["count"]:
        raise DataError(f"{index_path} holds {len(parts['keys'])} samples but {descriptor} says {info['count']}; re-index")
    table = ShardTable(
        source=descriptor.resolve(),
        root=root,
        shards=[s["name"] for s in info["shards"]],
        shard_bytes=[s["bytes"] for s in info["shards"]],
        skipped=dict(info.get("skipped", {})),
        _key_index=key_index,
        _mapped=mapped,
        **parts,
    )
    if check_shards:
        check_end_rows(table, descriptor, reindex_hint(root, info))
    return table
