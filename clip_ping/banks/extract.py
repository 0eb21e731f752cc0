"""Stage 1: frozen teacher features of every pair, in memory-mapped feature banks.

The bank's files and the reader of a finished bank (`FeatureBanks`,
`open_banks`) are in `clip_ping.banks.format`; the loop that decodes, encodes
and writes rows is in `clip_ping.banks.writer`. Both are importable from here.

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

What a bank is
--------------
Data (fingerprint, rows), teachers, storage dtype, the teachers' precisions
(``precision``, the image teacher's, and ``text_precision``) and
``teacher_image_size`` make a bank's identity (``format.identity_of``).
A request with the same identity keeps a complete bank or resumes an
unfinished one; any other is refused unless ``--overwrite``, so a bank never
mixes rows of two precisions or resolutions (banks written before the
precision options record none and count as fp32 at the teacher's own size).

The text teacher runs in bf16 by default where the device computes bf16
natively (``--text-precision auto``): 2.5x faster, and its top-1 neighbours are
fp32's for 99 % of rows or more. The image teacher stays fp32 by default: in
bf16 a twentieth of its top-1 neighbours change (BENCHMARKS.md, "Teacher
extraction speed").

Several processes (``torchrun --nproc-per-node K``): each rank takes every K-th
unfinished chunk and writes its rows into the same files; rank 0 prepares the
folder and writes the groups and the manifest.

The module is over 450 lines because starting, resuming, refusing and finishing a bank
decide together what a folder may hold; the files are in format.py, the work loop in writer.py.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, option
from ..data.pairs import data_fingerprint
from ..data.table import PairSource, open_table
from ..distributed import joined_process_group, native_bf16, resolve_device, warn_if_bf16_is_emulated
from ..errors import ConfigError, DataError
from ..io import (
    DiskFull,
    FolderClaim,
    atomic_save_npy,
    atomic_write_json,
    claim_folder,
    disk_full_cause,
    raise_disk_full,
)
from ..teachers import (
    DEFAULT_IMAGE_TEACHER,
    DEFAULT_TEXT_TEACHER,
    PRECISIONS,
    ImageTeacher,
    TextTeacher,
    image_teacher_factory,
    load_image_teacher,
    load_text_teacher,
    running_in,
    text_teacher_factory,
    transform_at_size,
)
from ..teachers.base import COMPILE_SETTINGS, compile_wanted, image_transform_of
from .format import (
    BANK_FILES,
    FORMAT_VERSION,
    MANIFEST,
    WORK_DIR,
    chunk_marker,
    done_chunks,
    duplicate_groups_of_captions,
    duplicate_groups_of_hashes,
    identity_of,
    legacy_bank_files,
    read_json,
    with_identity_defaults,
)
from .writer import extract_chunks

log = logging.getLogger(__name__)

_HASH_BYTES = 20  # sha1


# --------------------------------------------------------------------------- config


@dataclass
class ExtractConfig(Config):
    """Options of `clip-ping extract`."""

    data: str = option("", "pairs table (CSV/TSV), or a data set folder whose --split table is used")
    out: str = option("", "bank folder to write (created if needed)")
    split: str = option("train", "split table to use when --data is a data set folder")
    image_teacher: str = option(DEFAULT_IMAGE_TEACHER, "image teacher: a registered name, or timm:ARCH[:FILE] / open_clip:MODEL:FILE|TAG / "
                                "open_clip:hf-hub:ORG/REPO (see clip_ping.teachers)")
    text_teacher: str = option(
        DEFAULT_TEXT_TEACHER, "text teacher: a registered name, or sentence-transformers:DIR|NAME / hf:DIR|ORG/REPO / "
        "open_clip:MODEL:FILE|TAG (see clip_ping.teachers)"
    )
    batch_size: int = option(64, "rows per teacher batch (on a CPU the image teacher runs a batch in calls of about "
                             "4 images at 224 px, which keep its activations in the cache: the same features, faster)", bounds=">= 1")
    chunk_size: int = option(1024, "rows per resumable unit of work (a finished chunk is never recomputed)", bounds=">= 1")
    dtype: str = option("float16", "storage type of the feature banks", choices=("float16", "float32"))
    fingerprint: str = option("size", "how the bank recognises its data: size (paths, captions and file sizes: "
                              "instant) or content (also every image's bytes: reads the whole data set once more, at "
                              "each check; catches an image replaced by another of the same size)",
                              choices=("size", "content"))
    precision: str = option("fp32", "numeric precision of the image teacher (and of the text teacher, see "
                            "--text-precision): fp32, or bf16 (torch.autocast; "
                            "worth it on GPUs; on an AMX CPU only ~1.06x faster end to end, and elsewhere emulated "
                            "and many times slower; changes ~7 percent of top-1 image neighbours, CLIP-PING's quality "
                            "by about one seed's spread). Part of the bank's identity",
                            choices=PRECISIONS)
    text_precision: str = option("auto", "numeric precision of the text teacher: auto (bf16 where the device computes "
                                 "bf16 natively: 2.5x faster, the top-1 neighbours of 99 percent of rows or more unchanged; else as "
                                 "--precision), fp32 or bf16. Part of the bank's identity",
                                 choices=("auto", *PRECISIONS))
    teacher_image_size: int | None = option(None, "side in pixels the image teacher sees (default: its own, e.g. 224 "
                                            "for EfficientNet-Lite0); smaller is faster for small images (the "
                                            "built-in data is 64 px). Part of the bank's identity", bounds="[16, 2048]")
    compile: str = option("auto", "torch.compile the image teacher (auto: on a CPU with a C++ compiler, for 25,000 "
                          "images or more: a ~1.26x faster forward than the eager one after a ~20 s compile; "
                          "features match the uncompiled "
                          "teacher's to ~1e-5, so not part of the bank's identity)", choices=COMPILE_SETTINGS)
    workers: int = option(2, "DataLoader processes decoding and preprocessing images while the teachers run "
                          "(0: in the main process)", bounds=">= 0")
    device: str = option("auto", "device of the teachers: auto (this process's GPU under torchrun, else the CPU), cpu, cuda, cuda:N")
    threads: int = option(0, "torch threads of the teacher forward passes (0: torch's default, one per core)", bounds=">= 0")
    progress: bool = option(True, "show a progress bar")
    overwrite: bool = option(
        False,
        "replace a bank of other data, teachers or settings (dtype, precision, teacher image size) in --out instead of refusing "
        "(a bank of the same data and teachers is kept or resumed; delete the folder to rebuild it)",
    )

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("extract needs --data (a pairs CSV/TSV or a data set folder)")
        if not self.out:
            raise ConfigError("extract needs --out (the bank folder to write)")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"config key 'dtype': {self.dtype!r} is not one of float16, float32")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"config key 'precision': {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.text_precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"config key 'text_precision': {self.text_precision!r} is not one of auto, "
                              f"{', '.join(PRECISIONS)}")


# --------------------------------------------------------------------------- extraction


def extract_banks(
    cfg: ExtractConfig,
    table: PairSource | None = None,
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
    cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # each torchrun process its own GPU
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with joined_process_group() as (rank, world):
            return _extract(cfg, rank, world, table, image_teacher, text_teacher)
    finally:
        torch.set_num_threads(threads_before)


def _extract(
    cfg: ExtractConfig,
    rank: int,
    world: int,
    table: PairSource | None,
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
    precisions = {"image": cfg.precision, "text": text_precision(cfg)}
    identity = {
        "data_fingerprint": data_fingerprint(table, cfg.fingerprint),
        "data_fingerprint_kind": cfg.fingerprint,
        "count": len(table),
        "image_teacher": image_teacher.name if image_teacher is not None else cfg.image_teacher,
        "text_teacher": text_teacher.name if text_teacher is not None else cfg.text_teacher,
        "dtype": cfg.dtype,
        "precision": cfg.precision,
        "text_precision": precisions["text"],
        "teacher_image_size": cfg.teacher_image_size,
    }

    claims: list[FolderClaim] = []  # process 0's claim of the folder; its lock is held until the bank is done
    try:
        return _extract_into(out, cfg, rank, world, table, image_teacher, text_teacher, identity, precisions, claims)
    except DiskFull as exc:
        raise DiskFull(str(exc).replace("nothing was half-written", f"the bank so far in {out} is intact "
                                        "(run the same command again to continue it)")) from None
    finally:
        for claim in claims:
            claim.release()


def _extract_into(
    out: Path,
    cfg: ExtractConfig,
    rank: int,
    world: int,
    table: PairSource,
    image_teacher: ImageTeacher | None,
    text_teacher: TextTeacher | None,
    identity: dict[str, Any],
    precisions: dict[str, str],
    claims: list[FolderClaim],
) -> Path:
    def claim_and_inspect() -> str:
        claims.append(claim_folder(out, "bank", legacy=legacy_bank_files, lock=True))
        state = _inspect_folder(out, identity, cfg.overwrite, claims[0])
        claims[0].files([*BANK_FILES, f"{WORK_DIR}/"])
        return state

    state = _on_rank0(rank, world, claim_and_inspect)
    if state == "complete":
        log.info("bank %s is already complete for this data, these teachers and settings", out)
        return out

    if image_teacher is None:
        image_teacher = load_image_teacher(cfg.image_teacher, device=cfg.device)
    if text_teacher is None:
        text_teacher = load_text_teacher(cfg.text_teacher, device=cfg.device)

    run = _on_rank0(rank, world, lambda: _start_or_resume(out, cfg, table, identity, image_teacher, text_teacher, state))
    mine = run["pending"][rank::world]
    n_mine = sum(min(run["chunk_size"], len(table) - c * run["chunk_size"]) for c in mine)
    if compile_wanted(cfg.compile, cfg.device, n_mine):
        log.info("compiling the image teacher (torch.compile, %d rows a call)", run["batch_size"])
        image_teacher.compile(run["batch_size"])
    for side, precision in precisions.items():
        warn_if_bf16_is_emulated(precision, cfg.device, log, f"the {side} teacher runs")
    log.info("teachers' precision: image %s, text %s", precisions["image"], precisions["text"])
    size = cfg.teacher_image_size
    transform = image_transform_of(image_teacher) if size is None else transform_at_size(image_teacher, size)
    # teachers handed in get their own precision back after
    with running_in(precisions["image"], image_teacher), running_in(precisions["text"], text_teacher):
        extract_chunks(out, run, table, image_teacher, text_teacher, transform, mine, cfg.workers,
                       show_progress=cfg.progress and rank == 0, precisions=precisions, device=cfg.device)

    _barrier(world)  # every rank's chunks are on disk
    _on_rank0(rank, world, lambda: _finish(out, run, table, world))
    return out


def text_precision(cfg: ExtractConfig) -> str:
    """The text teacher's precision: ``--text-precision``, where ``auto`` is bf16 on a device that computes
    bf16 natively and ``--precision`` elsewhere."""
    if cfg.text_precision != "auto":
        return cfg.text_precision
    return "bf16" if native_bf16(cfg.device) else cfg.precision


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


def _inspect_folder(out: Path, identity: dict[str, Any], overwrite: bool, claim: FolderClaim) -> str:
    """'complete', 'resume' or 'fresh'; refuses (or, with overwrite, clears) a bank of something else."""
    found: dict[str, Any] | None = None
    manifest_path, run_path = out / MANIFEST, out / WORK_DIR / "run.json"
    if manifest_path.is_file():
        found, state = identity_of(read_json(manifest_path)), "complete"
    elif run_path.is_file():
        found, state = with_identity_defaults(read_json(run_path)["identity"]), "resume"
    if found is None:
        return "fresh"
    if found == identity:
        return state
    if not overwrite:
        diff = ", ".join(
            f"{k} {_short(found.get(k))} -> {_short(identity[k])}" for k in identity if found.get(k) != identity[k]
        )
        what = "a bank" if state == "complete" else "an unfinished extraction"
        raise DataError(f"{out} holds {what} of other data or teachers or settings ({diff}); use --overwrite to replace it")
    log.warning("--overwrite: removing the bank in %s", out)
    claim.remove(MANIFEST)  # first, so a half-cleared folder never looks complete
    claim.clear()
    return "fresh"


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 else text  # fingerprints: the first 12 hex digits say enough


def _start_or_resume(
    out: Path,
    cfg: ExtractConfig,
    table: PairSource,
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
        run = read_json(work / "run.json")
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
    done = done_chunks(work)
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
        _reserve_disk_space(tmp)
        os.replace(tmp, path)
    except DiskFull:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if disk_full_cause(exc) is not None:
            raise_disk_full(path)
        raise DataError(f"cannot create {path}: {exc.strerror or exc}") from None


def _reserve_disk_space(path: Path) -> None:
    """Allocate every block of the memory-mapped ``path`` now. A memory map is a sparse file: rows written past
    the disk's free space would kill the process with SIGBUS ("Bus error") mid-extraction; reserved up front, a
    full disk is an error here, before any row is computed."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if disk_full_cause(exc) is not None:
                raise_disk_full(path)
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system that cannot reserve
                raise


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
        del arr
        _reserve_disk_space(path)  # an extraction begun by an earlier clip-ping left sparse files


# --------------------------------------------------------------------------- finishing


def _finish(out: Path, run: dict[str, Any], table: PairSource, world: int) -> None:
    """Duplicate groups, then the manifest (last: it marks the bank complete), then clean up."""
    work = out / WORK_DIR
    missing = [c for c in range(run["n_chunks"]) if not chunk_marker(work, c).is_file()]
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
        "precision": identity["precision"],
        "text_precision": identity["text_precision"],
        "teacher_image_size": identity["teacher_image_size"],
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


# --------------------------------------------------------------------------- small file helpers


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
