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
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from ..config import option
from ..errors import ConfigError, DataError
from .pairs import (
    SKIP_BAD_ENCODING,
    SKIP_EMPTY_CAPTION,
    SKIP_MISSING_IMAGE,
    SPLITS,
    ImageDecodeError,
    PairTable,
    _to_rgb,
    read_pairs,
    split_file,
)

log = logging.getLogger(__name__)

FORMAT = "clip-ping-shards/1"
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
    keys: list[str]
    captions: list[str]
    labels: dict[str, list[str]]
    shard_ids: np.ndarray  # int32, which shard holds sample i
    offsets: np.ndarray  # int64, byte offset of the image data in that tar
    sizes: np.ndarray  # int64, image bytes
    exts: list[str]  # image extension per sample (png, jpg, ...)
    skipped: dict[str, int] = field(default_factory=dict)
    _key_index: dict[str, int] | None = field(default=None, repr=False)
    _fds: dict[int, int] = field(default_factory=dict, repr=False)
    _pid: int = field(default=-1, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def shard_path(self, j: int) -> Path:
        return self.root / self.shards[j]

    @property
    def key_to_index(self) -> dict[str, int]:
        if self._key_index is None:
            self._key_index = {k: i for i, k in enumerate(self.keys)}
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
        return decode_image_bytes(self.read_image_bytes(i), f"{self.shards[int(self.shard_ids[i])]}:{self.keys[i]}")

    def summary(self) -> dict[str, Any]:
        return {"source": str(self.source), "kept": len(self), "skipped": dict(self.skipped), "shards": len(self.shards)}

    def __getstate__(self) -> dict[str, Any]:
        # File descriptors do not travel to other processes.
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state


def decode_image_bytes(data: bytes, name: str = "image", background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode encoded image bytes to RGB, transparency composited on ``background``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _to_rgb(im, background)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        why = _BYTES_OBJECT.sub("the bytes", str(exc))  # PIL names the in-memory buffer, not the file
        raise ImageDecodeError(f"cannot decode image {name}: {why}") from None


_BYTES_OBJECT = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


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


def index_shards(shards: list[Path], descriptor: str | Path, split: str = "train") -> ShardTable:
    """Scan tar shards once and write the key -> index map (``<split>.index.csv``) and descriptor.

    Reads tar headers and the small caption / JSON members only, never image bytes.
    """
    descriptor = Path(descriptor)
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    root = descriptor.parent.resolve()
    keys: list[str] = []
    captions: list[str] = []
    label_rows: list[dict[str, str]] = []
    shard_ids: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    exts: list[str] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    shard_names: list[str] = []
    shard_bytes: list[int] = []
    per_shard: list[int] = []

    def count(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    def finish(sample: dict[str, Any] | None, j: int) -> None:
        if sample is None:
            return
        key = sample["key"]
        if "image" not in sample:
            count(SKIP_MISSING_IMAGE)
            return
        caption = sample.get("txt")
        labels: dict[str, str] = {}
        meta = sample.get("json")
        if isinstance(meta, dict):
            if caption is None:
                for name in CAPTION_FIELDS:
                    if isinstance(meta.get(name), str):
                        caption = meta[name].strip()
                        break
            raw = meta.get("labels") if isinstance(meta.get("labels"), dict) else {
                k: v for k, v in meta.items() if k not in CAPTION_FIELDS and isinstance(v, (str, int, float, bool))
            }
            labels = {str(k): str(v).strip() for k, v in raw.items()}
        if sample.get("bad_text"):
            count(SKIP_BAD_ENCODING)
            return
        if not caption:
            count(SKIP_EMPTY_CAPTION)
            return
        if key in seen:
            count(SKIP_DUPLICATE_KEY)
            return
        seen.add(key)
        keys.append(key)
        captions.append(caption)
        label_rows.append(labels)
        shard_ids.append(j)
        offsets.append(sample["image"][0])
        sizes.append(sample["image"][1])
        exts.append(sample["image"][2])
        per_shard[j] += 1

    for j, path in enumerate(shards):
        path = Path(path).resolve()
        shard_names.append(os.path.relpath(path, root))
        shard_bytes.append(path.stat().st_size)
        per_shard.append(0)
        sample: dict[str, Any] | None = None
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_name(member.name)
                    if sample is None or sample["key"] != key:
                        finish(sample, j)
                        sample = {"key": key}
                    last = ext.rsplit(".", 1)[-1]
                    if last in IMAGE_EXTS and "image" not in sample:
                        if member.offset_data + member.size > shard_bytes[-1]:
                            raise EOFError(f"member {member.name} runs past the end of the file")
                        sample["image"] = (member.offset_data, member.size, last)
                    elif last in ("txt", "json"):
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        text = _decode_text(data)
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
            log.warning("shard %s is damaged after %d samples (%s)", path, per_shard[j], exc)
            count(SKIP_CORRUPT_SHARD)
            sample = None
        finish(sample, j)

    if not keys:
        raise DataError(f"no usable samples in the {len(shards)} shard(s) given (skipped: {skipped or 'none'})")
    columns = sorted({k for row in label_rows for k in row})
    table = ShardTable(
        source=descriptor.resolve(),
        root=root,
        shards=shard_names,
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


# --------------------------------------------------------------------------- writing


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    # Fixed metadata: the same samples give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_shards(table: PairTable, out_dir: str | Path, split: str = "train", samples_per_shard: int = 1000) -> ShardTable:
    """Write a PairTable as ``<split>-NNNNNN.tar`` shards (image bytes copied as they are) and index them.

    Sample ``i`` of the table gets key ``<split>-<i, 9 digits>`` and keeps index ``i``
    (unless its image file cannot be read any more, then it is left out and counted).
    """
    if samples_per_shard < 1:
        raise ConfigError("config key 'samples_per_shard' must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tar: tarfile.TarFile | None = None
    unreadable = 0
    columns = list(table.labels)
    try:
        for i in range(len(table)):
            if i % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                paths.append(out_dir / f"{split}-{len(paths):06d}.tar")
                tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
            src = Path(table.filepaths[i])
            try:
                image = src.read_bytes()
            except OSError:
                unreadable += 1
                continue
            ext = src.suffix.lower().lstrip(".") or "img"
            if ext not in IMAGE_EXTS:
                ext = "png" if image[:4] == b"\x89PNG" else "jpg"
            key = f"{split}-{i:09d}"
            meta = {"labels": {c: table.labels[c][i] for c in columns}, "source": os.path.relpath(src, table.root)}
            assert tar is not None
            for name, data in (
                (f"{key}.{ext}", image),
                (f"{key}.txt", table.captions[i].encode("utf-8")),
                (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
            ):
                tar.addfile(*_tar_member(name, data))
    finally:
        if tar is not None:
            tar.close()
    result = index_shards(paths, out_dir / f"{split}.shards.json", split)
    if unreadable:
        result.skipped[SKIP_MISSING_IMAGE] = result.skipped.get(SKIP_MISSING_IMAGE, 0) + unreadable
        log.warning("%d image file(s) of %s could not be read and were left out", unreadable, table.source)
    return result


def shards_to_csv(table: ShardTable, out_dir: str | Path, split: str) -> PairTable:
    """Extract a shard split to ``OUT/images/<split>/`` + ``OUT/<split>.csv`` (same order, same indices)."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    columns = list(table.labels)
    with open(out_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filepath", "caption", *columns])
        for i, key in enumerate(table.keys):
            name = f"{key.replace('/', '_')}.{table.exts[i]}"
            (image_dir / name).write_bytes(table.read_image_bytes(i))
            writer.writerow([f"images/{split}/{name}", table.captions[i]] + [table.labels[c][i] for c in columns])
    return read_pairs(out_dir / f"{split}.csv", label_keys=columns)


# --------------------------------------------------------------------------- streaming


class ShardStream(torch.utils.data.IterableDataset):
    """Stream a ShardTable's tars with webdataset; yields ``{"index", "image", "text"}`` (or None).

    Shards are split over distributed processes and over loader workers, so each
    sample is read once per epoch. ``index`` comes from the key -> index map and
    the caption from the index, so alignment does not depend on the order of reading.
    Call `set_epoch` before each epoch to change the shuffle.
    """

    def __init__(
        self,
        table: ShardTable,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        shuffle_buffer: int = 0,
        shuffle_shards: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.table = table
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.epoch = 0
        self.n_unknown_keys = 0
        self.n_decode_errors = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:  # samples per epoch over all workers, for progress bars
        return len(self.table)

    def _pipeline(self):
        import webdataset as wds

        urls = [str(self.table.shard_path(j)) for j in range(len(self.table.shards))]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        dataset = wds.WebDataset(
            urls,
            shardshuffle=len(urls) if self.shuffle_shards else False,
            detshuffle=True,
            seed=self.seed + self.epoch,
            nodesplitter=wds.split_by_node if distributed else wds.single_node_only,
            workersplitter=wds.split_by_worker,
            handler=wds.warn_and_continue,
            empty_check=False,
        )
        if self.shuffle_buffer > 1:
            # Runs inside the loader worker: one reproducible stream per (seed, epoch, worker).
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            dataset = dataset.shuffle(self.shuffle_buffer, seed=(self.seed * 1009 + self.epoch) * 101 + worker)
        return dataset

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        key_to_index = self.table.key_to_index
        for sample in self._pipeline():
            index = key_to_index.get(sample["__key__"])
            if index is None:
                self.n_unknown_keys += 1  # not in the index (skipped when indexing)
                continue
            ext = self.table.exts[index]
            data = next((v for k, v in sample.items() if k.rsplit(".", 1)[-1].lower() == ext), None)
            if data is None:
                continue
            try:
                image = decode_image_bytes(data, sample["__key__"])
            except ImageDecodeError as exc:
                self.n_decode_errors += 1
                log.warning("sample %d (row %d of the index) dropped: %s", index, index, exc)
                yield None
                continue
            text: Any = self.table.captions[index]
            if self.tokenizer is not None:
                text = self.tokenizer([text])[0]
            yield {"index": index, "image": self.image_transform(image), "text": text}


# --------------------------------------------------------------------------- tables in general


def open_split(source: str | Path, split: str = "train", **read_kwargs: Any) -> PairTable | ShardTable:
    """The table of one split, whatever its storage.

    ``source`` may be a CSV/TSV file, a shard descriptor (``*.shards.json``), or a
    data set folder holding ``<split>.csv``/``.tsv`` or ``<split>.shards.json``.
    """
    source = Path(source)
    if source.is_dir():
        descriptor = source / f"{split}.shards.json"
        if descriptor.is_file():
            return open_shards(descriptor)
        return read_pairs(split_file(source, split), **read_kwargs)
    if source.name.endswith(".shards.json"):
        return open_shards(source)
    return read_pairs(source, **read_kwargs)


# --------------------------------------------------------------------------- convert


@dataclass
class ConvertConfig:
    src: str = option("", "data set folder, CSV/TSV file, shard folder, or tar shards ('dir/*.tar', 'a-{000..009}.tar')")
    out: str = option("", "output folder")
    to: str = option("shards", "target format", choices=("shards", "csv", "index"))
    split: str = option("", "only this split (default: every split found; 'train' for a bare CSV or tar list)")
    samples_per_shard: int = option(1000, "samples per tar shard")
    image_key: str = option("filepath", "image path column of the CSV (open_clip's csv_img_key)")
    caption_key: str = option("caption", "caption column of the CSV (open_clip's csv_caption_key)")
    separator: str = option("", "CSV separator (default: by suffix; ',' or '\\t')")
    overwrite: bool = option(False, "write into a non-empty output folder")

    def validate(self) -> None:
        if not self.src:
            raise ConfigError("config key 'src' is required (the data to convert)")
        if not self.out:
            raise ConfigError("config key 'out' is required (the output folder)")
        if self.samples_per_shard < 1:
            raise ConfigError("config key 'samples_per_shard' must be at least 1")


def _is_tar_spec(src: str) -> bool:
    return src.endswith(".tar") or src.endswith(".tar}") or "{" in src


def convert(cfg: ConvertConfig) -> dict[str, Any]:
    """Convert between CSV tables and tar shards; returns (and writes) a JSON summary.

    * ``to=shards``: each split table of ``src`` -> ``OUT/<split>-NNNNNN.tar`` + index.
    * ``to=csv``: each ``<split>.shards.json`` (or tar list) of ``src`` -> images + ``OUT/<split>.csv``.
    * ``to=index``: index foreign tar shards (``src``, a list/glob/brace range) in place of
      a copy: writes only ``OUT/<split>.shards.json`` + ``OUT/<split>.index.csv``.
    ``dataset.json`` is copied along.
    """
    cfg.validate()
    started = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise DataError(f"{out} exists and is not empty; pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    src = Path(cfg.src)
    summary: dict[str, Any] = {"src": cfg.src, "out": str(out), "to": cfg.to, "splits": {}}
    read_kwargs = {"image_key": cfg.image_key, "caption_key": cfg.caption_key, "separator": cfg.separator or None}

    if cfg.to in ("shards", "csv") and not _is_tar_spec(cfg.src):
        if src.is_dir():
            splits = [cfg.split] if cfg.split else [
                s for s in SPLITS
                if any((src / f"{s}{x}").is_file() for x in (".csv", ".tsv", ".shards.json"))
            ]
            if not splits:
                raise DataError(f"{src} holds no train/val/test table or shard descriptor")
            sources = {s: open_split(src, s, **read_kwargs) for s in splits}
        else:
            split = cfg.split or src.name.split(".")[0]
            sources = {split: open_split(src, split, **read_kwargs)}
        for split, table in sources.items():
            if cfg.to == "shards":
                if isinstance(table, ShardTable):
                    raise DataError(f"{cfg.src}: split '{split}' is already stored as shards")
                result = write_shards(table, out, split, cfg.samples_per_shard)
                summary["splits"][split] = {"kept": len(result), "skipped": _merge(table.skipped, result.skipped),
                                            "shards": len(result.shards), "fingerprint": result.fingerprint()}
            else:
                if not isinstance(table, ShardTable):
                    raise DataError(f"{cfg.src}: split '{split}' is already a CSV table")
                result_csv = shards_to_csv(table, out, split)
                summary["splits"][split] = {"kept": len(result_csv), "skipped": dict(table.skipped),
                                            "fingerprint": result_csv.fingerprint()}
        meta = (src if src.is_dir() else src.parent) / "dataset.json"
        if meta.is_file() and meta.resolve() != (out / "dataset.json").resolve():
            shutil.copyfile(meta, out / "dataset.json")
    else:
        # Foreign tar shards: index them (to=index), or index into OUT then extract (to=csv).
        if cfg.to == "shards":
            raise DataError(f"{cfg.src} is already tar shards; use --to index or --to csv")
        split = cfg.split or "train"
        shards = expand_shards(cfg.src)
        table = index_shards(shards, out / f"{split}.shards.json", split)
        entry: dict[str, Any] = {"kept": len(table), "skipped": dict(table.skipped), "shards": len(shards),
                                 "fingerprint": table.fingerprint()}
        if cfg.to == "csv":
            entry["fingerprint"] = shards_to_csv(table, out, split).fingerprint()
        summary["splits"][split] = entry
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (out / "convert_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    merged = dict(a)
    for k, v in b.items():
        merged[k] = merged.get(k, 0) + v
    return merged
