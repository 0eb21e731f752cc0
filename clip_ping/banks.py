"""Stage 1: frozen teacher features of every pair, in memory-mapped feature banks.

Bank folder (see DEVELOPERS.md, "Banks")::

    BANK/
      image.npy        N x d_a  teacher image features, L2-normalised (float16 by default)
      text.npy         N x d_b  teacher text features, L2-normalised
      valid.npy        N bool   the image decoded (an undecodable image keeps a zero row)
      image_group.npy  N int64  rows with identical image bytes share the id of the first one
      text_group.npy   N int64  rows with identical captions (whitespace-normalised) likewise
      manifest.json    written last: its presence means the bank is complete

Row ``i`` is sample index ``i`` of the PairTable, always: nothing is ever dropped
or shifted.

Resumable extraction
--------------------
Rows are processed in chunks of ``chunk_size``. While a run is unfinished, the
folder holds ``.extract/`` with ``run.json`` (what is being built), the image
file hashes and one ``chunk_XXXXXXXX.done`` marker per finished chunk. A chunk's
rows are written into the memory maps and flushed to disk *before* its marker
is created (write to a temporary name, then ``os.replace``, which is atomic), so
a process killed at any moment, even by SIGKILL, leaves at worst a chunk
without marker, which the next run simply recomputes. Batches never cross a
chunk boundary and their size is fixed by ``run.json``, so a resumed bank is
bit-identical to an uninterrupted one. Once every chunk is done the duplicate
groups and ``manifest.json`` are written and ``.extract/`` is removed.

Several processes (``torchrun --nproc-per-node K``): each rank takes every K-th
unfinished chunk and writes its rows into the same files; rank 0 prepares the
folder and writes the groups and the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .config import option
from .data.pairs import ImageDecodeError, PairTable, data_fingerprint, load_image
from .data.table import PairSource, open_table
from .distributed import init_from_env, resolve_device
from .errors import ClipPingError, ConfigError, DataError
from .io import atomic_save_npy, atomic_write_json
from .teachers import (
    DEFAULT_IMAGE_TEACHER,
    DEFAULT_TEXT_TEACHER,
    ImageTeacher,
    TextTeacher,
    image_teacher_factory,
    load_image_teacher,
    load_text_teacher,
    text_teacher_factory,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WORK_DIR = ".extract"  # in-progress state; removed when the bank is complete
BANK_FILES = ("image.npy", "text.npy", "valid.npy", "image_group.npy", "text_group.npy", MANIFEST)
FORMAT_VERSION = 1
_HASH_BYTES = 20  # sha1
_MAX_DECODE_WARNINGS = 10


# --------------------------------------------------------------------------- config


@dataclass
class ExtractConfig:
    """Options of `clip-ping extract`."""

    data: str = option("", "pairs table (CSV/TSV), or a data set folder whose --split table is used")
    out: str = option("", "bank folder to write (created if needed)")
    split: str = option("train", "split table to use when --data is a data set folder")
    image_teacher: str = option(DEFAULT_IMAGE_TEACHER, "image teacher: a registered name or timm:/open_clip: spec")
    text_teacher: str = option(
        DEFAULT_TEXT_TEACHER, "text teacher: a registered name or sentence-transformers:/hf:/open_clip: spec"
    )
    batch_size: int = option(64, "rows per teacher forward pass")
    chunk_size: int = option(1024, "rows per resumable unit of work (a finished chunk is never recomputed)")
    dtype: str = option("float16", "storage type of the feature banks", choices=("float16", "float32"))
    fingerprint: str = option("size", "how the bank recognises its data: size (paths, captions and file sizes: "
                              "instant) or content (also every image's bytes: reads the whole data set once more, at "
                              "each check; catches an image replaced by another of the same size)",
                              choices=("size", "content"))
    workers: int = option(2, "DataLoader processes decoding and preprocessing images (0: in the main process)")
    device: str = option("auto", "device of the teachers: auto (this process's GPU under torchrun, else the CPU), cpu, cuda, cuda:N")
    threads: int = option(0, "torch threads of the teacher forward passes (0: torch's default, one per core)")
    progress: bool = option(True, "show a progress bar")
    overwrite: bool = option(
        False,
        "replace a bank of other data or teachers in --out instead of refusing "
        "(a bank of the same data and teachers is kept or resumed; delete the folder to rebuild it)",
    )

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("extract needs --data (a pairs CSV/TSV or a data set folder)")
        if not self.out:
            raise ConfigError("extract needs --out (the bank folder to write)")
        for key in ("batch_size", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be at least 1")
        if self.threads < 0:
            raise ConfigError("config key 'threads' must be 0 (torch's default) or more")
        if self.workers < 0:
            raise ConfigError("config key 'workers' must be 0 or more")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"config key 'dtype': {self.dtype!r} is not one of float16, float32")


# --------------------------------------------------------------------------- reading banks


class FeatureBanks:
    """A finished bank, memory-mapped: nothing is read from disk until rows are used.

    ``image`` (N x d_a), ``text`` (N x d_b), ``valid``, ``image_group``,
    ``text_group`` are read-only ``np.memmap`` arrays; ``manifest`` is the dict of
    ``manifest.json``. Use `gather` to fetch rows as float32 tensors.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self.manifest = manifest
        self.image = arrays["image"]
        self.text = arrays["text"]
        self.valid = arrays["valid"]
        self.image_group = arrays["image_group"]
        self.text_group = arrays["text_group"]

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __repr__(self) -> str:
        return f"FeatureBanks({str(self.path)!r}, n={len(self)}, image_dim={self.image_dim}, text_dim={self.text_dim})"

    # Pickling a memmap would copy the whole bank; a worker process reopens the files instead.
    def __reduce__(self) -> tuple[Callable, tuple]:
        return (open_banks, (self.path,))

    @property
    def image_dim(self) -> int:
        return int(self.image.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[1])

    def fingerprint(self) -> str:
        """The bank's identity, ``manifest["fingerprint"]``: new whenever the bank is rebuilt (neighbour tables record it)."""
        fp = self.manifest.get("fingerprint")
        return str(fp) if fp else hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()

    def gather(self, rows: np.ndarray | torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text bank rows as float32 tensors of shape ``rows.shape + (d,)``.

        Reads only the requested rows from the memory maps (any integer shape,
        e.g. B or B x k neighbour indices).
        """
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"bank rows must lie in [0, {len(self)}), got {flat.min()}..{flat.max()}")
        image = torch.from_numpy(np.asarray(self.image[flat], dtype=np.float32))
        text = torch.from_numpy(np.asarray(self.text[flat], dtype=np.float32))
        return image.reshape(*rows.shape, -1), text.reshape(*rows.shape, -1)


def open_banks(bank_dir: str | Path, table: PairSource | None = None) -> FeatureBanks:
    """Open a finished bank read-only; with ``table``, check that it was built for that table.

    Raises `DataError` when the folder holds no bank, an unfinished one (with how
    to resume), a damaged one, or one built for other data.
    """
    path = Path(bank_dir)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        run_file = path / WORK_DIR / "run.json"
        if run_file.is_file():
            run = _read_json(run_file)
            done = len(_done_chunks(path / WORK_DIR))
            raise DataError(
                f"extraction into bank {path} is unfinished ({done} of {run.get('n_chunks', '?')} chunks done); "
                f"resume it by running the same command again: clip-ping extract --data {run.get('data', 'DATA')} --out {path}"
            )
        raise DataError(f"no feature bank in {path} (no {MANIFEST}); build it with: clip-ping extract --data DATA --out {path}")
    manifest = _read_json(manifest_path)
    count = int(manifest.get("count", -1))
    dims = manifest.get("dims", {})
    arrays: dict[str, np.ndarray] = {}
    expected = {
        "image": (count, dims.get("image")),
        "text": (count, dims.get("text")),
        "valid": (count,),
        "image_group": (count,),
        "text_group": (count,),
    }
    for key, shape in expected.items():
        file = path / f"{key}.npy"
        try:
            arrays[key] = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"bank {path} is damaged: cannot read {file.name} ({exc}); re-run clip-ping extract --overwrite") from None
        if tuple(arrays[key].shape) != tuple(shape):
            raise DataError(
                f"bank {path} is damaged: {file.name} has shape {arrays[key].shape}, manifest says {shape}; "
                "re-run clip-ping extract --overwrite"
            )
    if table is not None:
        check_table(manifest, table, path)
    return FeatureBanks(path, manifest, arrays)


def check_table(manifest: dict[str, Any], table: PairSource, bank_dir: str | Path) -> None:
    """Refuse a bank whose rows do not belong to ``table`` (count and data fingerprint, of the kind the bank used)."""
    fingerprint = data_fingerprint(table, manifest.get("data_fingerprint_kind", "size"))
    if int(manifest.get("count", -1)) != len(table) or manifest.get("data_fingerprint") != fingerprint:
        raise DataError(
            f"bank {bank_dir} was built for another data set (fingerprint {str(manifest.get('data_fingerprint'))[:12]}, "
            f"{manifest.get('count')} rows; this table: {fingerprint[:12]}, {len(table)} rows); re-run clip-ping extract"
        )


# --------------------------------------------------------------------------- extraction


def extract_banks(
    cfg: ExtractConfig,
    table: PairTable | None = None,
    image_teacher: ImageTeacher | None = None,
    text_teacher: TextTeacher | None = None,
) -> Path:
    """Run (or resume) stage 1 and return the bank folder.

    ``table`` and the teachers are read/loaded from ``cfg`` unless given (handy
    when they are already in memory). Under ``torchrun`` each process extracts
    its share of the chunks. A complete bank of the same data and teachers is
    left as is; a bank of other data or teachers is refused unless
    ``cfg.overwrite``.
    """
    cfg.validate()
    cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # each torchrun process its own GPU
    joined_here = dist.is_available() and not dist.is_initialized()
    rank, world = init_from_env()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _extract(cfg, rank, world, table, image_teacher, text_teacher)
    finally:
        torch.set_num_threads(threads_before)
        # A process group left open at exit can abort the process (gloo threads); close ours.
        if joined_here and dist.is_initialized():
            dist.destroy_process_group()


def _extract(
    cfg: ExtractConfig,
    rank: int,
    world: int,
    table: PairTable | None,
    image_teacher: ImageTeacher | None,
    text_teacher: TextTeacher | None,
) -> Path:
    out = Path(cfg.out)
    # Fail on a misspelt teacher before anything else (nothing is loaded yet).
    if image_teacher is None:
        image_teacher_factory(cfg.image_teacher)
    if text_teacher is None:
        text_teacher_factory(cfg.text_teacher)
    if table is None:
        table = open_table(cfg.data, cfg.split)
    identity = {
        "data_fingerprint": data_fingerprint(table, cfg.fingerprint),
        "data_fingerprint_kind": cfg.fingerprint,
        "count": len(table),
        "image_teacher": image_teacher.name if image_teacher is not None else cfg.image_teacher,
        "text_teacher": text_teacher.name if text_teacher is not None else cfg.text_teacher,
        "dtype": cfg.dtype,
    }

    state = _on_rank0(rank, world, lambda: _inspect_folder(out, identity, cfg.overwrite))
    if state == "complete":
        log.info("bank %s is already complete for this data and these teachers", out)
        return out

    if image_teacher is None:
        image_teacher = load_image_teacher(cfg.image_teacher, device=cfg.device)
    if text_teacher is None:
        text_teacher = load_text_teacher(cfg.text_teacher, device=cfg.device)

    run = _on_rank0(rank, world, lambda: _start_or_resume(out, cfg, table, identity, image_teacher, text_teacher, state))
    mine = run["pending"][rank::world]
    _extract_chunks(out, run, table, image_teacher, text_teacher, mine, cfg.workers, show_progress=cfg.progress and rank == 0)

    _barrier(world)  # every rank's chunks are on disk
    _on_rank0(rank, world, lambda: _finish(out, run, table, world))
    return out


def _on_rank0(rank: int, world: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised on every rank below, so no rank waits forever
            error = exc
    if world > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _inspect_folder(out: Path, identity: dict[str, Any], overwrite: bool) -> str:
    """'complete', 'resume' or 'fresh'; refuses (or, with overwrite, clears) a bank of something else."""
    found: dict[str, Any] | None = None
    manifest_path, run_path = out / MANIFEST, out / WORK_DIR / "run.json"
    if manifest_path.is_file():
        found, state = _identity_of(_read_json(manifest_path)), "complete"
    elif run_path.is_file():
        found, state = _read_json(run_path)["identity"], "resume"
    if found is None:
        return "fresh"
    if found == identity:
        return state
    if not overwrite:
        diff = ", ".join(
            f"{k} {_short(found.get(k))} -> {_short(identity[k])}" for k in identity if found.get(k) != identity[k]
        )
        what = "a bank" if state == "complete" else "an unfinished extraction"
        raise DataError(f"{out} holds {what} of other data or teachers ({diff}); use --overwrite to replace it")
    log.warning("--overwrite: removing the bank in %s", out)
    _clear(out)
    return "fresh"


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 else text  # fingerprints: the first 12 hex digits say enough


def _identity_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "data_fingerprint": manifest.get("data_fingerprint"),
        "data_fingerprint_kind": manifest.get("data_fingerprint_kind", "size"),
        "count": manifest.get("count"),
        "image_teacher": manifest.get("teachers", {}).get("image", {}).get("name"),
        "text_teacher": manifest.get("teachers", {}).get("text", {}).get("name"),
        "dtype": manifest.get("dtype"),
    }


def _clear(out: Path) -> None:
    # Only our own files: the folder may hold other things (e.g. neighbour tables, which check the bank).
    (out / MANIFEST).unlink(missing_ok=True)  # first, so a half-cleared folder never looks complete
    for name in BANK_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)


def _start_or_resume(
    out: Path,
    cfg: ExtractConfig,
    table: PairTable,
    identity: dict[str, Any],
    image_teacher: ImageTeacher,
    text_teacher: TextTeacher,
    state: str,
) -> dict[str, Any]:
    """Create the arrays and ``run.json`` (fresh) or read them back (resume); returns the run with pending chunks."""
    work = out / WORK_DIR
    n = len(table)
    dims = {"image": int(image_teacher.dim), "text": int(text_teacher.dim)}
    if state == "resume":
        run = _read_json(work / "run.json")
        if run["dims"] != dims:
            raise DataError(f"unfinished extraction in {out} used teachers of dims {run['dims']}, now {dims}; use --overwrite")
        for key in ("chunk_size", "batch_size"):
            if run[key] != getattr(cfg, key):
                log.warning("resuming with %s=%d as started (ignoring %d)", key, run[key], getattr(cfg, key))
        _check_arrays(out, run)
    else:
        work.mkdir(parents=True, exist_ok=True)
        for stale in work.glob("chunk_*.done"):
            stale.unlink()
        run = {
            "format": FORMAT_VERSION,
            "identity": identity,
            "data": str(cfg.data),
            "dims": dims,
            "chunk_size": cfg.chunk_size,
            "batch_size": cfg.batch_size,
            "n_chunks": -(-n // cfg.chunk_size),
            "started": _now(),
        }
        dtype = np.dtype(cfg.dtype)
        # Each array is created under a temporary name and renamed, so a file with a
        # final name is always whole; run.json is written after them all.
        _create_array(out / "image.npy", (n, dims["image"]), dtype)
        _create_array(out / "text.npy", (n, dims["text"]), dtype)
        _create_array(out / "valid.npy", (n,), np.dtype(bool))
        _create_array(work / "image_hash.npy", (n, _HASH_BYTES), np.dtype(np.uint8))
        atomic_write_json(work / "run.json", run)
    done = _done_chunks(work)
    run["pending"] = [c for c in range(run["n_chunks"]) if c not in done]
    if done:
        log.info("resuming extraction into %s: %d of %d chunks already done", out, len(done), run["n_chunks"])
    return run


def _create_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    tmp = path.with_name(path.name + ".tmp")  # a preallocated memory map, filled chunk by chunk later
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        arr.flush()
        del arr
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot create {path}: {exc.strerror or exc}") from None


def _check_arrays(out: Path, run: dict[str, Any]) -> None:
    n = run["identity"]["count"]
    dtype = np.dtype(run["identity"]["dtype"])
    want = {
        out / "image.npy": ((n, run["dims"]["image"]), dtype),
        out / "text.npy": ((n, run["dims"]["text"]), dtype),
        out / "valid.npy": ((n,), np.dtype(bool)),
        out / WORK_DIR / "image_hash.npy": ((n, _HASH_BYTES), np.dtype(np.uint8)),
    }
    for path, (shape, dt) in want.items():
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            raise DataError(f"unfinished extraction in {out} lost {path.name}; start over with --overwrite") from None
        if arr.shape != shape or arr.dtype != dt:
            raise DataError(f"unfinished extraction in {out}: {path.name} has the wrong shape; start over with --overwrite")


def _chunk_marker(work: Path, chunk: int) -> Path:
    return work / f"chunk_{chunk:08d}.done"


def _done_chunks(work: Path) -> set[int]:
    return {int(p.name[6:14]) for p in work.glob("chunk_*.done")}


# --------------------------------------------------------------------------- the work loop


class _ImageRows(torch.utils.data.Dataset):
    """Row i -> its image through the teacher's transform (or None) and the sha1 of its file bytes."""

    def __init__(self, table: PairTable, transform: Callable) -> None:
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


def _chunk_batches(chunks: list[int], n: int, chunk_size: int, batch_size: int) -> Iterator[range]:
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


def _extract_chunks(
    out: Path,
    run: dict[str, Any],
    table: PairTable,
    image_teacher: ImageTeacher,
    text_teacher: TextTeacher,
    chunks: list[int],
    workers: int,
    show_progress: bool,
) -> None:
    """Compute and write the rows of ``chunks``; mark each chunk done once its rows are on disk."""
    n, chunk_size, batch_size = len(table), run["chunk_size"], run["batch_size"]
    work = out / WORK_DIR
    image_bank = np.load(out / "image.npy", mmap_mode="r+")
    text_bank = np.load(out / "text.npy", mmap_mode="r+")
    valid = np.load(out / "valid.npy", mmap_mode="r+")
    hashes = np.load(work / "image_hash.npy", mmap_mode="r+")
    dtype = image_bank.dtype

    batches = list(_chunk_batches(chunks, n, chunk_size, batch_size))
    loader = torch.utils.data.DataLoader(
        _ImageRows(table, image_teacher.transform),
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

            # Undecodable images keep an all-zero row, so rows never shift.
            image_feats = torch.zeros(len(index), image_teacher.dim)
            if batch["image"] is not None:
                feats = image_teacher.encode(batch["image"])
                _check_features(feats, image_teacher.dim, int(ok.sum()), "image", image_teacher.name)
                image_feats[ok] = F.normalize(feats.float(), dim=-1)
            feats = text_teacher.encode([table.captions[i] for i in index.tolist()])
            _check_features(feats, text_teacher.dim, len(index), "text", text_teacher.name)
            text_feats = F.normalize(feats.float(), dim=-1)

            image_bank[start:stop] = image_feats.numpy().astype(dtype)
            text_bank[start:stop] = text_feats.numpy().astype(dtype)
            valid[start:stop] = ok.numpy()
            hashes[start:stop] = batch["hash"].numpy()
            for message in batch["errors"]:
                decode_warnings += 1
                if decode_warnings <= _MAX_DECODE_WARNINGS:
                    log.warning("%s (its row keeps a zero image feature, valid=False)", message)
            bar.update(len(index))

            chunk = start // chunk_size
            if stop == min((chunk + 1) * chunk_size, n):  # the chunk's last batch
                for arr in (image_bank, text_bank, valid, hashes):
                    arr.flush()  # rows on disk first ...
                atomic_write_json(_chunk_marker(work, chunk), {"rows": [chunk * chunk_size, stop]})  # ... then the marker
    if decode_warnings > _MAX_DECODE_WARNINGS:
        log.warning("%d more images could not be decoded", decode_warnings - _MAX_DECODE_WARNINGS)


def _check_features(feats: torch.Tensor, dim: int, rows: int, kind: str, name: str) -> None:
    if tuple(feats.shape) != (rows, dim):
        raise ClipPingError(f"{kind} teacher '{name}' returned shape {tuple(feats.shape)}, expected ({rows}, {dim})")
    if not torch.isfinite(feats).all():
        raise ClipPingError(f"{kind} teacher '{name}' returned non-finite features")


# --------------------------------------------------------------------------- finishing


def _finish(out: Path, run: dict[str, Any], table: PairTable, world: int) -> None:
    """Duplicate groups, then the manifest (last: it marks the bank complete), then clean up."""
    work = out / WORK_DIR
    missing = [c for c in range(run["n_chunks"]) if not _chunk_marker(work, c).is_file()]
    if missing:
        raise DataError(f"extraction into {out} is missing chunks {missing[:5]}; run the same command again to finish it")

    hashes = np.load(work / "image_hash.npy")
    image_group = duplicate_groups_of_hashes(hashes)
    text_group = duplicate_groups_of_captions(table.captions)
    atomic_save_npy(out / "image_group.npy", image_group)
    atomic_save_npy(out / "text_group.npy", text_group)

    valid = np.load(out / "valid.npy", mmap_mode="r")
    n_invalid = int(len(valid) - valid.sum())
    if n_invalid:
        log.warning("%d of %d images could not be decoded: zero image features, valid=False", n_invalid, len(valid))
    identity = run["identity"]
    manifest = {
        "format": FORMAT_VERSION,
        "count": identity["count"],
        "dtype": identity["dtype"],
        "normalised": True,
        "teachers": {
            "image": {"name": identity["image_teacher"], "dim": run["dims"]["image"]},
            "text": {"name": identity["text_teacher"], "dim": run["dims"]["text"]},
        },
        "dims": dict(run["dims"]),
        "data_fingerprint": identity["data_fingerprint"],
        "data_fingerprint_kind": identity["data_fingerprint_kind"],
        "data": {"source": str(table.source), "kept": len(table), "skipped": dict(table.skipped)},
        "skipped": {"undecodable_images": n_invalid},
        "duplicates": {
            "image_rows_in_groups": int((image_group != np.arange(len(image_group))).sum()),
            "text_rows_in_groups": int((text_group != np.arange(len(text_group))).sum()),
        },
        "chunk_size": run["chunk_size"],
        "batch_size": run["batch_size"],
        "processes": world,
        "started": run["started"],
        "created": _now(),
    }
    # The bank's identity for the tables built on it (neighbours): new at every rebuild.
    manifest["fingerprint"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    log.info("bank %s complete: %d rows, image %d-d, text %d-d", out, manifest["count"], *run["dims"].values())


def duplicate_groups_of_hashes(hashes: np.ndarray) -> np.ndarray:
    """Group id per row (N x B byte digests): the index of the first row with the same digest."""
    keys = np.ascontiguousarray(hashes).view(np.dtype((np.void, hashes.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)


def normalize_caption(caption: str) -> str:
    """Caption key for duplicate detection: runs of whitespace collapsed, ends stripped."""
    return " ".join(caption.split())


def duplicate_groups_of_captions(captions: Sequence[str]) -> np.ndarray:
    """Group id per row: the index of the first row with the same whitespace-normalised caption."""
    first: dict[str, int] = {}
    return np.array([first.setdefault(normalize_caption(c), i) for i, c in enumerate(captions)], dtype=np.int64)


# --------------------------------------------------------------------------- small file helpers


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None



