"""The shard index in memory and on disk: compact string columns, the key index, the index file.

A split of 12M samples held as Python lists of ``str`` costs about 60 bytes a row
beyond the text in every process, and the reference counts that reading them
writes copy their pages into every forked loader worker. Here each text column is
one UTF-8 buffer plus N + 1 int64 end offsets (`StringColumn`, 8 bytes a row
beyond the text), the image extension is one byte a row (`CodedColumn`), and the
key -> row map is two sorted arrays (`KeyIndex`, 16 bytes a row). Reading them
never writes their pages, so forked workers share them.

Index file, format ``clip-ping-shards/2``: ``<split>.index.bin`` holds the arrays
back to back (each 64-byte aligned); the descriptor JSON names each one's offset,
dtype and length, so `read_index` memory-maps the file and reads nothing up front
(the page cache is then shared by every process on the machine). Format 1 (a CSV
``<split>.index.csv``) is still read, into the same columns.

Staleness: the descriptor records each shard's size, modification time and a digest
of its member table (every tar header block: names, sizes, in order; never the data). `check_shard` runs when a split is opened: a stat per
shard, and the member table is read only for a shard whose modification time
changed, so a rewritten shard whose members moved (even at the same size) is
refused and a copied one is accepted.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import logging
import operator
import os
import sys
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, overload

import numpy as np

from ..errors import DataError
from ..io import atomic_write

log = logging.getLogger(__name__)
_ALIGN = 64
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
CHUNK = 1 << 16  # rows read at once when a whole column is walked
_ENC = ("utf-8", "surrogateescape")  # tar member names may hold undecodable bytes


class StringColumn(Sequence[str]):
    """N strings as one UTF-8 buffer (uint8) and N + 1 int64 end offsets; reads like a list of str."""

    __hash__ = None  # type: ignore[assignment]  # equality is by content, like a list

    def __init__(self, data: np.ndarray, ends: np.ndarray) -> None:
        if ends.ndim != 1 or len(ends) < 1 or (len(ends) and int(ends[-1]) != len(data)):
            raise DataError(f"string column: {len(ends)} end offsets do not fit {len(data)} bytes of text")
        self.data, self.ends = data, ends
        self._view = np.ascontiguousarray(data).data  # slicing a memoryview is cheaper than an ndarray

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> StringColumn:
        encoded = [s.encode(*_ENC) for s in strings]
        ends = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=ends[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), ends)

    def __len__(self) -> int:
        return len(self.ends) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if type(i) is int and i >= 0:  # the common case first (past the end, .item raises IndexError)
            return self._view[self.ends.item(i):self.ends.item(i + 1)].tobytes().decode(*_ENC)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        j = operator.index(i)
        n = len(self)
        if not -n <= j < n:
            raise IndexError(f"row {j} of {n}")
        return self[j % n]

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), CHUNK):
            for raw in self.raw(start, start + CHUNK):
                yield raw.decode(*_ENC)

    def raw(self, start: int, stop: int) -> list[bytes]:
        """Rows start:stop as their UTF-8 bytes (one buffer copy and one offsets list, not one per row)."""
        ends = self.ends[start:min(stop, len(self)) + 1].tolist()
        if len(ends) < 2:
            return []
        buf, base = bytes(self._view[ends[0]:ends[-1]]), ends[0]
        return [buf[a - base:b - base] for a, b in zip(ends[:-1], ends[1:])]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, tuple, StringColumn)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"StringColumn({len(self)} strings, {len(self.data)} bytes)"

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.ends.nbytes)


class CodedColumn(Sequence[str]):
    """A column of few distinct strings (image extensions): one uint8 code a row and the names."""

    def __init__(self, codes: np.ndarray, names: Sequence[str]) -> None:
        self.codes, self.names = codes, list(names)

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> CodedColumn:
        names: dict[str, int] = {}
        codes = [names.setdefault(s, len(names)) for s in strings]
        if len(names) > 255:
            raise DataError(f"{len(names)} distinct image extensions in one index (at most 255)")
        return cls(np.asarray(codes, dtype=np.uint8), list(names))

    def __len__(self) -> int:
        return len(self.codes)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self.names[c] for c in self.codes[i].tolist()]
        return self.names[int(self.codes[i])]


def _hash64(key: str) -> int:
    """63 bits of blake2b: int64 arrays search a Python int fast (a uint64 array needs a numpy scalar)."""
    return int.from_bytes(hashlib.blake2b(key.encode(*_ENC), digest_size=8).digest(), "little") >> 1


class KeyIndex:
    """Key -> sample index for millions of keys, as sorted 63-bit hashes in two numpy arrays.

    A dict of 12M Python strings costs gigabytes in every loader worker (reference
    counts copy its pages after a fork); these arrays are 16 bytes a key and stay
    shared (format 2 stores them in the index file, so no process hashes the keys again).
    A hash match is confirmed against the key itself, so collisions are harmless.
    """

    def __init__(self, keys: Sequence[str], sorted_hashes: np.ndarray | None = None,
                 order: np.ndarray | None = None) -> None:
        if sorted_hashes is None or order is None:
            hashes = np.fromiter((_hash64(k) for k in keys), dtype=np.int64, count=len(keys))
            order = np.argsort(hashes, kind="stable")
            sorted_hashes = hashes[order]
        self._order, self._sorted, self._keys = order, sorted_hashes, keys

    def get(self, key: str) -> int | None:
        h = _hash64(key)
        pos = int(self._sorted.searchsorted(h))
        n = len(self._sorted)
        while pos < n and self._sorted.item(pos) == h:
            i = self._order.item(pos)
            if self._keys[i] == key:
                return int(i)
            pos += 1
        return None


def rows_fingerprint(keys: StringColumn, captions: StringColumn, sizes: np.ndarray) -> str:
    """sha256 of the bytes of f"{key}\\0{caption}\\0{size}\\n" over the rows, hashed a chunk of rows at a time."""
    h = hashlib.sha256()
    for start in range(0, len(keys), CHUNK):
        rows = zip(keys.raw(start, start + CHUNK), captions.raw(start, start + CHUNK),
                   sizes[start:start + CHUNK].tolist())
        h.update(b"".join(b"%s\0%s\0%d\n" % row for row in rows))
    return h.hexdigest()


# --------------------------------------------------------------------------- is a shard still what was indexed


def _size_field(field: bytes) -> int | None:
    """A tar header's size field: octal digits, or base-256 (first bit set) past 8 GiB; None if neither."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None


def member_table_digest(path: Path) -> str:
    """sha256 of a tar's member table: every header block (names, sizes, times, and the extension
    headers of long names), in order, read by seeking from header to header, never the data.

    One 512-byte read a member (about 2 µs of CPU each, BENCHMARKS.md), where `tarfile` takes ten
    times longer. A tar cut short (a header or a member's data past the end, or no end-of-archive
    block) hashes the headers before the cut and a marker, so the same cut tar gives the same digest.
    """
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset + tarfile.BLOCKSIZE <= size:
            block = os.pread(fd, tarfile.BLOCKSIZE, offset)
            if block == _ZERO_BLOCK:  # the end-of-archive marker
                return digest.hexdigest()
            data = _size_field(block[124:136])
            if data is None or offset + tarfile.BLOCKSIZE + data > size:  # not a header, or its data is cut
                break
            digest.update(block)
            offset += tarfile.BLOCKSIZE + -(-data // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    finally:
        os.close(fd)
    digest.update(b"\0cut short\n")
    return digest.hexdigest()


def check_shard(path: Path, recorded: dict[str, Any], descriptor: Path, reindex: str) -> bool:
    """Refuse (`DataError`, one line) a shard that changed since ``descriptor`` indexed it.

    Same size and modification time: unchanged (one stat). Another modification time: the member
    table is read and compared, so a copy (new time, same members) passes and a rewrite whose
    members moved does not. Returns whether the member table was read. A descriptor of an older
    version records the size only; that is all it can check.
    """
    try:
        st = path.stat()
    except OSError:
        raise DataError(f"shard {path} listed in {descriptor} is missing") from None
    changed = f"shard {path} changed since it was indexed (in {descriptor})"
    if st.st_size != recorded["bytes"]:
        raise DataError(f"{changed} ({recorded['bytes']} bytes then, {st.st_size} now); re-index: {reindex}")
    if "members" not in recorded or st.st_mtime_ns == recorded.get("mtime_ns"):
        return False
    if member_table_digest(path) != recorded["members"]:
        raise DataError(f"{changed} (same size, but its members are not where the index says: another order or "
                        f"other files); re-index: {reindex}")
    return True


def warn_if_unverifiable(descriptor: Path, shards: list[dict[str, Any]]) -> None:
    if shards and any("members" not in s for s in shards):
        log.warning("%s was indexed by an older clip-ping, which recorded the shards' sizes only: a shard rewritten "
                    "at the same size would not be noticed; re-index it to record their member tables", descriptor)


# --------------------------------------------------------------------------- the index file


def write_index(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    """Write ``arrays`` back to back into ``path`` (atomically); returns name -> [offset, dtype, length]."""
    layout: dict[str, list[Any]] = {}

    def write(f: Any) -> None:
        pos = 0
        for name, arr in arrays.items():
            pad = -pos % _ALIGN
            f.write(b"\0" * pad)
            pos += pad
            arr = np.ascontiguousarray(arr)
            layout[name] = [pos, arr.dtype.str, int(arr.shape[0])]
            f.write(arr.data.cast("B"))
            pos += arr.nbytes

    atomic_write(path, write)
    return layout


def read_index(path: Path, layout: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    """The arrays of an index file, memory-mapped read-only (nothing is read until used)."""
    if not path.is_file():
        raise DataError(f"shard index {path} is missing; re-index (clip-ping data convert --to index)")
    size = path.stat().st_size
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
    out: dict[str, np.ndarray] = {}
    for name, (offset, dtype, length) in layout.items():
        dt = np.dtype(dtype)
        stop = int(offset) + int(length) * dt.itemsize
        if stop > size:
            raise DataError(f"shard index {path} is truncated ({size} bytes, {name} ends at {stop}); re-index")
        out[name] = raw[int(offset):stop].view(dt)
    return out


def read_csv_index(path: Path, columns: Sequence[str]) -> dict[str, Any]:
    """Format 1: the CSV index (key, shard, offset, size, ext, caption, label columns...)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    keys, captions, shard_ids, offsets, sizes, exts = [], [], [], [], [], []
    labels: dict[str, list[str]] = {c: [] for c in columns}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header[:6] != ["key", "shard", "offset", "size", "ext", "caption"]:
            raise DataError(f"{path} is not a shard index (header {header[:6]})")
        for row in reader:
            keys.append(row[0])
            shard_ids.append(int(row[1]))
            offsets.append(int(row[2]))
            sizes.append(int(row[3]))
            exts.append(row[4])
            captions.append(row[5])
            for c, value in zip(columns, row[6:]):
                labels[c].append(value)
    return {"keys": StringColumn.from_strings(keys), "captions": StringColumn.from_strings(captions),
            "labels": {c: StringColumn.from_strings(v) for c, v in labels.items()},
            "shard_ids": np.asarray(shard_ids, dtype=np.int32), "offsets": np.asarray(offsets, dtype=np.int64),
            "sizes": np.asarray(sizes, dtype=np.int64), "exts": CodedColumn.from_strings(exts)}


def split_name(member_name: str) -> tuple[str, str]:
    """WebDataset key and extension: 'dir/abc.seg.png' -> ('dir/abc', 'seg.png')."""
    folder, base = os.path.split(member_name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def reindex_hint(root: Path, info: dict[str, Any]) -> str:
    split = str(info.get("split", "train"))
    names = [str(s["name"]) for s in info["shards"]]
    pattern = f"{split}-*.tar" if all(Path(n).name.startswith(f"{split}-") for n in names) else "*.tar"
    return f"clip-ping data convert --to index --src '{root / pattern}' --split {split} --out {root} --overwrite"


def check_end_rows(table: Any, descriptor: Path, reindex: str) -> None:
    """The tar header just before the first and the last indexed image of each shard must name that
    row's key and size. Two reads a shard; they catch a rewrite that kept the shard's size and
    modification time (``cp -p``, ``rsync -t``) whenever it moved either end's sample."""
    counts = np.bincount(table.shard_ids, minlength=len(table.shards)).tolist()
    start = 0
    for j, n in enumerate(counts):
        if n:
            with open(table.shard_path(j), "rb") as f:
                for row in dict.fromkeys((start, start + n - 1)):
                    found = _member_before(f, int(table.offsets[row]))
                    key, size = table.keys[row], int(table.sizes[row])
                    if found is None or found[1] != size or (found[0] is not None and found[0] != key):
                        what = f"{found[0]} of {found[1]} bytes" if found else "no member header"
                        raise DataError(f"shard {table.shard_path(j)} changed since it was indexed (in {descriptor}): "
                                        f"the index has {key} ({size} bytes) at byte {table.offsets[row]}, the tar "
                                        f"has {what} there; re-index: {reindex}")
        start += n


def _member_before(f: Any, offset: int) -> tuple[str | None, int] | None:
    """(key, size) of the tar member whose data starts at ``offset``, from the header block before it
    (key None when the header's name field may be cut: a long name lives in an extension header);
    None when no valid header is there."""
    if offset < tarfile.BLOCKSIZE:
        return None
    f.seek(offset - tarfile.BLOCKSIZE)
    try:
        info = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None
    return (None if len(info.name) >= 99 else split_name(info.name)[0]), info.size


def check_shards_unchanged(descriptor: Path, root: Path, info: dict[str, Any]) -> None:
    """Refuse the split when a shard changed since it was indexed (`check_shard`: a stat per shard,
    the member table of those whose modification time changed)."""
    reindex = reindex_hint(root, info)
    warn_if_unverifiable(descriptor, info["shards"])
    reread = sum(check_shard(root / shard["name"], shard, descriptor, reindex) for shard in info["shards"])
    if reread:
        log.info("%s: %d shard(s) have new modification times but the members indexed (copied?); "
                 "re-indexing makes opening them a stat again", descriptor, reread)


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
