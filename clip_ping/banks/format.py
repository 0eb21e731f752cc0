"""The feature bank on disk: its files, its manifest, and the read-only view of a finished bank.

Bank folder (see DEVELOPERS.md, "Banks")::

    BANK/
      image.npy        N x d_a  teacher image features, L2-normalised (float16 by default)
      text.npy         N x d_b  teacher text features, L2-normalised
      valid.npy        N bool   the image decoded (an undecodable image keeps a zero row)
      image_group.npy  N int64  rows with identical image bytes share the id of the first one
      text_group.npy   N int64  rows with identical captions (whitespace-normalised) likewise
      manifest.json    written last: its presence means the bank is complete

Row ``i`` is sample index ``i`` of the PairTable, always: nothing is ever dropped
or shifted. The stage that writes banks is `clip_ping.banks.extract`; this module only
names the files and reads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.pairs import data_fingerprint
from ..data.table import PairSource
from ..errors import DataError

MANIFEST = "manifest.json"
WORK_DIR = ".extract"  # in-progress state; removed when the bank is complete
BANK_FILES = ("image.npy", "text.npy", "valid.npy", "image_group.npy", "text_group.npy", MANIFEST)
FORMAT_VERSION = 1

# What makes two banks the same bank. Keys added after format 1's first release default to what
# banks written before them were: fp32 teachers at their own resolution, the text teacher in the
# image teacher's precision (one option set both).
IDENTITY_DEFAULTS: dict[str, Any] = {"data_fingerprint_kind": "size", "precision": "fp32", "teacher_image_size": None}


def with_identity_defaults(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` with the keys it was written without set to what they were then."""
    full = {**IDENTITY_DEFAULTS, **identity}
    full.setdefault("text_precision", full["precision"])
    return full


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
            run = read_json(run_file)
            done = len(done_chunks(path / WORK_DIR))
            raise DataError(
                f"extraction into bank {path} is unfinished ({done} of {run.get('n_chunks', '?')} chunks done); "
                f"resume it by running the same command again: clip-ping extract --data {run.get('data', 'DATA')} --out {path}"
            )
        raise DataError(f"no feature bank in {path} (no {MANIFEST}); build it with: clip-ping extract --data DATA --out {path}")
    manifest = read_json(manifest_path)
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


def identity_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a finished bank was built from and how (compared with a new request: the same -> the same bank)."""
    teachers = manifest.get("teachers", {})
    recorded: dict[str, Any] = {key: manifest[key] for key in ("data_fingerprint_kind", "precision", "text_precision",
                                                "teacher_image_size") if key in manifest}
    return with_identity_defaults({
        "data_fingerprint": manifest.get("data_fingerprint"),
        "count": manifest.get("count"),
        "image_teacher": teachers.get("image", {}).get("name"),
        "text_teacher": teachers.get("text", {}).get("name"),
        "dtype": manifest.get("dtype"),
        **recorded,
    })


# --------------------------------------------------------------------------- duplicate groups


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


# --------------------------------------------------------------------------- progress markers, small files


def chunk_marker(work: Path, chunk: int) -> Path:
    """The file whose presence says chunk ``chunk``'s rows are on disk."""
    return work / f"chunk_{chunk:08d}.done"


def done_chunks(work: Path) -> set[int]:
    return {int(p.name[6:14]) for p in work.glob("chunk_*.done")}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def legacy_bank_files(out: Path) -> list[str] | None:
    """The files of a bank written before folders carried clip-ping's marker: one with a bank's manifest, or an
    unfinished extraction's ``.extract/run.json`` (None: not a bank)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8")) if (out / MANIFEST).is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not ((isinstance(manifest, dict) and "count" in manifest and (out / "image.npy").is_file())
            or (manifest is None and (out / WORK_DIR / "run.json").is_file())):
        return None
    return [name for name in BANK_FILES if (out / name).is_file()] + [f"{WORK_DIR}/"] * (out / WORK_DIR).is_dir()
