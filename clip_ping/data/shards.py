"""WebDataset tar shards: writing, indexing once, random access and streaming, and `convert`.

Shard layout
------------
A split stored as shards is a folder holding the tar files and two small index files::

    OUT/train-000000.tar  train-000001.tar ...
    OUT/train.shards.json      descriptor: shard list (name, samples, bytes), count, labels, fingerprint
    OUT/train.index.csv        one row per sample, in sample-index order:
                               key, shard, offset, size, caption, label columns...

Inside a tar, the files of one sample share a key (WebDataset convention: the
name up to the first dot): ``<key>.png`` (or jpg / jpeg / webp ...) and
``<key>.txt`` (the caption) and optionally ``<key>.json`` (``{"labels": {...}}``,
or a JSON object whose ``caption``/``text`` field is the caption when there is
no ``.txt``).

Stable sample indices
---------------------
The index file is the key -> index map, written once by `index_shards` (shards
written by `write_shards` are indexed right away; shards made by other tools,
e.g. img2dataset, are indexed on first use). Sample index ``i`` is row ``i`` of
the index: the order of the shards in the descriptor, then of the members in
each tar. Every reader (random access, or streaming in any order, with any
number of workers and processes) maps a sample's key back to that index, so
feature banks and neighbour tables stay aligned. Samples without an image or
with an empty caption are left out of the index (counted by reason). A shard
whose size changed since it was indexed is refused.

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

import csv
import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
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

log = logging.getLogger(__name__)

FORMAT = "clip-ping-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
CAPTION_FIELDS = ("caption", "text", "txt")
SKIP_DUPLICATE_KEY = "duplicate_key"
SKIP_CORRUPT_SHARD = "corrupt_shard_tail"

# --------------------------------------------------------------------------- table


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


class KeyIndex:
    """Key -> sample index for millions of keys, as sorted 64-bit hashes in two numpy arrays.

    A dict of 12M Python strings costs gigabytes in every loader worker (reference
    counts copy its pages after a fork); these arrays are 16 bytes a key and stay
    shared. A hash match is confirmed against the key itself, so collisions are harmless.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        hashes = np.fromiter((_hash64(k) for k in keys), dtype=np.uint64, count=len(keys))
        self._order = np.argsort(hashes, kind="stable")
        self._sorted = hashes[self._order]
        self._keys = keys

    def get(self, key: str) -> int | None:
        h = np.uint64(_hash64(key))
        pos = int(np.searchsorted(self._sorted, h))
        while pos < len(self._sorted) and self._sorted[pos] == h:
            i = int(self._order[pos])
            if self._keys[i] == key:
                return i
            pos += 1
        return None



@dataclass
class ShardTable:
    """The indexed samples of one split stored as tar shards. Row ``i`` is sample index ``i``."""

    source: Path  # the <split>.shards.json descriptor
    root: Path  # folder the shard names are relative to
    shards: list[str]
    shard_bytes: list[int]
    keys: list[str]
    captions: list[str]
    labels: dict[str, list[str]]
    shard_ids: np.ndarray  # int32, which shard holds sample i
    offsets: np.ndarray  # int64, byte offset of the image data in that tar
    sizes: np.ndarray  # int64, image bytes
    exts: list[str]  # image extension per sample (png, jpg, ...)
    skipped: dict[str, int] = field(default_factory=dict)
    _key_index: KeyIndex | None = field(default=None, repr=False)
    _fds: dict[int, int] = field(default_factory=dict, repr=False)
    _pid: int = field(default=-1, repr=False)

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
        """sha256 over the samples (key, caption, image size), like `PairTable.fingerprint`."""
        h = hashlib.sha256()
        for key, caption, size in zip(self.keys, self.captions, self.sizes.tolist()):
            h.update(f"{key}\0{caption}\0{size}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

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
    def image_ids(self) -> list[str]:
        """One id per row's image (keys are unique in an index, so no two rows share one)."""
        return self.keys

    def summary(self) -> dict[str, Any]:
        return {"source": str(self.source), "kept": len(self), "skipped": dict(self.skipped), "shards": len(self.shards)}

    def __getstate__(self) -> dict[str, Any]:
        # File descriptors do not travel to other processes.
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state


# --------------------------------------------------------------------------- indexing


def _split_name(member_name: str) -> tuple[str, str]:
    """WebDataset key and extension: 'dir/abc.seg.png' -> ('dir/abc', 'seg.png')."""
    folder, base = os.path.split(member_name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def _decode_text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


def expand_shards(spec: str | Path | list[str]) -> list[Path]:
    """Shard paths from a list, a glob ('data/*.tar') or a brace range ('train-{000000..000009}.tar')."""
    if isinstance(spec, (list, tuple)):
        paths: list[Path] = []
        for s in spec:
            paths += expand_shards(s)
        return paths
    text = str(spec)
    if "{" in text:
        import braceexpand  # a dependency of webdataset

        names = list(braceexpand.braceexpand(text))
    elif any(c in text for c in "*?["):
        names = sorted(glob.glob(text))
    else:
        names = [text]
    missing = [n for n in names if not os.path.isfile(n)]
    if missing:
        raise DataError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not names:
        raise DataError(f"no shard matches {text}")
    return [Path(n) for n in names]


@dataclass
class _ShardScan:
    """What one tar holds: its samples in member order, and the members left out."""

    samples: list[tuple[str, str, dict[str, str], int, int, str]]  # key, caption, labels, offset, size, ext
    skipped: dict[str, int]
    bytes: int


def _scan_shard(path: Path, label_fields: Sequence[str] = ()) -> _ShardScan:
    """Read one tar's headers and small caption / JSON members (never image bytes).

    Labels are the JSON's ``labels`` object, plus the top-level fields named in
    ``label_fields`` (img2dataset's JSON holds url, status, sizes...: not labels by default).
    """
    samples: list[tuple[str, str, dict[str, str], int, int, str]] = []
    skipped: dict[str, int] = {}
    size = path.stat().st_size

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
                key, ext = _split_name(member.name)
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
    return _ShardScan(samples, skipped, size)


def index_shards(shards: list[Path], descriptor: str | Path, split: str = "train", label_fields: Sequence[str] = (),
                 workers: int = 0, progress: bool = False) -> ShardTable:
    """Scan tar shards once and write the key -> index map (``<split>.index.csv``) and descriptor.

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
    per_shard: list[int] = []
    scan = partial(_scan_shard, label_fields=tuple(label_fields))
    # spawn, not fork: a fork of a process running torch threads can hang on a lock they held
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 and len(paths) > 1 else None
    try:
        scans = pool.imap(scan, paths) if pool is not None else map(scan, paths)
        for j, result in enumerate(tqdm(scans, total=len(paths), desc="index shards", unit="shard", disable=not progress)):
            shard_bytes.append(result.bytes)
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
    table = ShardTable(
        source=descriptor.resolve(),
        root=root,
        shards=[os.path.relpath(p, root) for p in paths],
        shard_bytes=shard_bytes,
        keys=keys,
        captions=captions,
        labels={c: [row.get(c, "") for row in label_rows] for c in columns},
        shard_ids=np.asarray(shard_ids, dtype=np.int32),
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
        exts=exts,
        skipped=skipped,
    )
    _save_index(table, split, per_shard)
    if skipped:
        log.warning("%s: indexed %d samples, skipped %s", descriptor, len(keys), skipped)
    return table


def _index_path(descriptor: Path, split: str) -> Path:
    return descriptor.parent / f"{split}.index.csv"


def _save_index(table: ShardTable, split: str, per_shard: list[int]) -> None:
    index_path = _index_path(table.source, split)
    columns = list(table.labels)
    with open(index_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["key", "shard", "offset", "size", "ext", "caption", *columns])
        for i, key in enumerate(table.keys):
            writer.writerow(
                [key, int(table.shard_ids[i]), int(table.offsets[i]), int(table.sizes[i]), table.exts[i], table.captions[i]]
                + [table.labels[c][i] for c in columns]
            )
    info = {
        "format": FORMAT,
        "split": split,
        "count": len(table),
        "index": index_path.name,
        "labels": columns,
        "fingerprint": table.fingerprint(),
        "skipped": table.skipped,
        "shards": [
            {"name": name, "samples": n, "bytes": b} for name, n, b in zip(table.shards, per_shard, table.shard_bytes)
        ],
    }
    table.source.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def open_shards(descriptor: str | Path) -> ShardTable:
    """Load an indexed split (``<split>.shards.json``); refuses shards changed since indexing."""
    descriptor = Path(descriptor)
    if descriptor.is_dir():
        descriptor = descriptor / "train.shards.json"
    if not descriptor.is_file():
        raise DataError(f"shard descriptor not found: {descriptor} (index tar shards with clip-ping data convert)")
    try:
        info = json.loads(descriptor.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{descriptor} is not valid JSON: {exc}") from None
    if info.get("format") != FORMAT:
        raise DataError(f"{descriptor} is not a clip-ping shard descriptor (format {info.get('format')!r})")
    root = descriptor.parent.resolve()
    for shard in info["shards"]:
        path = root / shard["name"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in {descriptor} is missing")
        if path.stat().st_size != shard["bytes"]:
            raise DataError(f"shard {path} changed since it was indexed; re-index it (clip-ping data convert --to index)")
    index_path = root / info["index"]
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    keys, captions, shard_ids, offsets, sizes, exts = [], [], [], [], [], []
    columns = list(info.get("labels", []))
    labels: dict[str, list[str]] = {c: [] for c in columns}
    with open(index_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header[:6] != ["key", "shard", "offset", "size", "ext", "caption"]:
            raise DataError(f"{index_path} is not a shard index (header {header[:6]})")
        for row in reader:
            keys.append(row[0])
            shard_ids.append(int(row[1]))
            offsets.append(int(row[2]))
            sizes.append(int(row[3]))
            exts.append(row[4])
            captions.append(row[5])
            for c, value in zip(columns, row[6:]):
                labels[c].append(value)
    if len(keys) != info["count"]:
        raise DataError(f"{index_path} holds {len(keys)} samples but {descriptor} says {info['count']}; re-index")
    return ShardTable(
        source=descriptor.resolve(),
        root=root,
        shards=[s["name"] for s in info["shards"]],
        shard_bytes=[s["bytes"] for s in info["shards"]],
        keys=keys,
        captions=captions,
        labels=labels,
        shard_ids=np.asarray(shard_ids, dtype=np.int32),
        offsets=np.asarray(offsets, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64),
        exts=exts,
        skipped=dict(info.get("skipped", {})),
    )
