"""The neighbour tables on disk: the build stage (`clip-ping neighbors`), the file format, the reader.

Files (in the bank folder, see DEVELOPERS.md): ``neighbors_image.npy`` and
``neighbors_text.npy`` (int64 N x k), ``neighbors_image_scores.npy`` and
``neighbors_text_scores.npy`` (float32 N x k), ``neighbors.json`` (written last;
its ``format`` is checked on read). While a build runs, ``.neighbors/<side>/`` keeps
its finished blocks; a killed build resumes from them, and they are removed at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..banks.format import legacy_bank_files
from ..config import Config, option
from ..distributed import joined_process_group
from ..errors import ConfigError, DataError
from ..io import atomic_save_npy, atomic_write_json, claim_folder
from .search import AUTO_EXACT_MAX_ROWS, DEFAULT_K_FACTOR, METHODS, _pick_device, resolve_method, search_neighbors
from .tiled import TILE_PRECISIONS

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

NEIGHBOR_FILES = {
    "image": "neighbors_image.npy",
    "text": "neighbors_text.npy",
    "image_scores": "neighbors_image_scores.npy",
    "text_scores": "neighbors_text_scores.npy",
}
NEIGHBORS_JSON = "neighbors.json"
# Finished search blocks while a build runs (fast method): a killed build resumes from them.
RESUME_DIR = ".neighbors"


# --------------------------------------------------------------------------- stage: build tables


@dataclass
class NeighborsConfig(Config):
    """Options of `clip-ping neighbors`."""

    banks: str = option("", "feature bank folder written by clip-ping extract (neighbour files are written into it)")
    k: int = option(10, "neighbours kept per sample, best first", bounds=">= 1")
    method: str = option(
        "auto", f"search method: exact (FAISS), fast (tiled, exact, resumable), ivf, ivfpq, hnsw (approximate); "
        f"auto = fast on a GPU, else fast up to {AUTO_EXACT_MAX_ROWS:,} rows and ivfpq above", choices=METHODS)
    exclude: str = option(
        "both", "duplicates that are never neighbours: both (same image bytes or same caption), "
        "same_side (same image for image-side, same caption for text-side), self (only the sample itself)",
        choices=("both", "same_side", "self"))
    nprobe: int = option(0, "IVF lists searched per query (0: automatic, nlist/16 for ivf, nlist/4 for ivfpq, "
                         "at least 32); more is slower and more exact", bounds=">= 0")
    k_factor: int = option(DEFAULT_K_FACTOR, "ivfpq: candidates re-scored exactly per neighbour fetched; more is "
                           "slower and more exact", bounds=">= 1")
    tiles: str = option("auto", "fast: precision of the score tiles (auto: bf16 on GPUs, fp32 on CPUs); "
                        "the result is exact either way", choices=TILE_PRECISIONS)
    block_size: int = option(16384, "query rows per search block (bounds memory)", bounds=">= 1")
    device: str = option("auto", "device of the fast method: auto, cpu, cuda")
    overwrite: bool = option(False, "rebuild the neighbour files even when up to date")
    progress: bool = option(True, "progress bars")

    def validate(self) -> None:
        if not self.banks:
            raise ConfigError("neighbors needs --banks (the feature bank folder written by clip-ping extract)")
        if self.tiles not in TILE_PRECISIONS:
            raise ConfigError(f"config key 'tiles': {self.tiles!r} is not one of {', '.join(TILE_PRECISIONS)}")
        if self.method not in METHODS:
            raise ConfigError(f"config key 'method': {self.method!r} is not one of {', '.join(METHODS)}")


def bank_fingerprint(bank_dir: str | Path) -> str:
    """The bank's identity: ``manifest["fingerprint"]`` if present, else sha256 of manifest.json.

    (The second is what ``FeatureBanks.fingerprint()`` returns.)
    """
    path = Path(bank_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{bank_dir} is not a finished feature bank (no manifest.json); run clip-ping extract first")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError:
        raise DataError(f"{path} is not valid JSON; re-run clip-ping extract") from None
    fp = manifest.get("fingerprint") if isinstance(manifest, dict) else None
    return str(fp) if fp else hashlib.sha256(raw).hexdigest()


def _load_bank_array(bank_dir: Path, name: str) -> np.ndarray:
    path = bank_dir / name
    if not path.is_file():
        raise DataError(f"bank {bank_dir} has no {name}; re-run clip-ping extract")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None




def _read_info(bank_dir: Path) -> dict[str, Any] | None:
    path = bank_dir / NEIGHBORS_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path} is not valid JSON; re-run clip-ping neighbors --overwrite") from None
    if not isinstance(info, dict):
        raise DataError(f"{path} is damaged; re-run clip-ping neighbors --overwrite")
    return info


def build_neighbors(cfg: NeighborsConfig) -> Path:
    """Search image-side (in image.npy) and text-side (in text.npy) neighbours; write the tables.

    Returns the path of ``neighbors.json``. An up-to-date table (same bank, k,
    method and exclusions) is kept unless ``overwrite``.
    """
    with joined_process_group(_pick_device(cfg.device)) as (rank, world):  # under torchrun the fast search spreads
        return _build_neighbors(cfg, rank, world)                          # over the processes


def _build_neighbors(cfg: NeighborsConfig, rank: int, world: int) -> Path:
    bank_dir = Path(cfg.banks)
    if not bank_dir.is_dir():
        raise DataError(f"bank folder not found: {bank_dir}")
    # process 0 writes the tables: it claims them in the bank's folder and holds its lock while it searches
    bank_fingerprint(bank_dir)  # a folder that is no bank is named as such before any claim
    if rank == 0:  # a bank of an earlier clip-ping (no marker) is recorded as a bank first
        claim_folder(bank_dir, "bank", legacy=legacy_bank_files, option="--banks")
    claim = claim_folder(bank_dir, "neighbours", joins=("bank",), legacy=legacy_neighbour_files, lock=True,
                         option="--banks") if rank == 0 else None
    try:
        if claim is not None:
            claim.files([*NEIGHBOR_FILES.values(), NEIGHBORS_JSON, f"{RESUME_DIR}/"])
        return _build(cfg, rank, bank_dir)
    finally:
        if claim is not None:
            claim.release()


def legacy_neighbour_files(bank_dir: Path) -> list[str] | None:
    """The neighbour tables an earlier clip-ping wrote into a bank folder (None when there are none)."""
    if not (bank_dir / NEIGHBORS_JSON).is_file():
        return None
    return [name for name in (*NEIGHBOR_FILES.values(), NEIGHBORS_JSON) if (bank_dir / name).is_file()] + \
        [f"{RESUME_DIR}/"] * (bank_dir / RESUME_DIR).is_dir()


def _build(cfg: NeighborsConfig, rank: int, bank_dir: Path) -> Path:
    fingerprint = bank_fingerprint(bank_dir)
    image = _load_bank_array(bank_dir, "image.npy")
    text = _load_bank_array(bank_dir, "text.npy")
    valid = _load_bank_array(bank_dir, "valid.npy")
    image_group = _load_bank_array(bank_dir, "image_group.npy")
    text_group = _load_bank_array(bank_dir, "text_group.npy")
    n = image.shape[0]
    for name, arr in (("text.npy", text), ("valid.npy", valid), ("image_group.npy", image_group),
                      ("text_group.npy", text_group)):
        if arr.shape[0] != n:
            raise DataError(f"bank {bank_dir} is inconsistent: {name} has {arr.shape[0]} rows, image.npy {n}")

    n_valid = int(np.asarray(valid).sum())
    method = resolve_method(cfg.method, n_valid, _pick_device(cfg.device))
    # What makes a stored table reusable (fast and exact give the same result, so the
    # requested method is compared, not the one "auto" resolved to).
    settings = {"k": cfg.k, "requested_method": cfg.method, "exclude": cfg.exclude,
                "nprobe": cfg.nprobe if method in ("ivf", "ivfpq") else None,
                "k_factor": cfg.k_factor if method == "ivfpq" else None}
    json_path = bank_dir / NEIGHBORS_JSON
    old = _read_info(bank_dir)
    if old is not None and old.get("format") != FORMAT_VERSION:
        log.info("neighbours in %s are in table format %r, not %d; rebuilding", bank_dir, old.get("format"), FORMAT_VERSION)
        old = None
    if old is not None and not cfg.overwrite:
        same = old.get("bank_fingerprint") == fingerprint and all(old.get(key) == v for key, v in settings.items())
        if same and all((bank_dir / f).is_file() for f in NEIGHBOR_FILES.values()):
            log.info("neighbours in %s are up to date (k=%d, %s); --overwrite rebuilds them", bank_dir, cfg.k, method)
            return json_path
        if old.get("bank_fingerprint") == fingerprint:
            raise ConfigError(
                f"{json_path} holds neighbours with other settings (k={old.get('k')}, "
                f"method={old.get('requested_method')}, "
                f"exclude={old.get('exclude')}); use --overwrite to replace them"
            )
        log.info("neighbours in %s belong to an older bank; rebuilding", bank_dir)

    groups: dict[str, np.ndarray | None]
    if cfg.exclude == "both":
        groups = {"image": np.stack([image_group, text_group], axis=1), "text": np.stack([text_group, image_group], axis=1)}
    elif cfg.exclude == "same_side":
        groups = {"image": np.asarray(image_group), "text": np.asarray(text_group)}
    else:
        groups = {"image": None, "text": None}

    results: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    details: dict[str, Any] = {}
    for side, feats in (("image", image), ("text", text)):
        stats: dict[str, Any] = {}
        t0 = time.perf_counter()
        idx, scores = search_neighbors(
            feats, cfg.k, groups=groups[side], valid=valid, method=method, block_size=cfg.block_size,
            nprobe=cfg.nprobe or None, k_factor=cfg.k_factor, tiles=cfg.tiles, device=cfg.device,
            progress=cfg.progress, desc=f"{side}-side neighbours",
            stats=stats, resume_dir=bank_dir / RESUME_DIR / side,
            resume_key=json.dumps({"bank": fingerprint, "side": side, **settings}, sort_keys=True),
        )
        timings[f"{side}_s"] = round(time.perf_counter() - t0, 3)
        results[side], results[f"{side}_scores"] = idx, scores
        details[side] = stats
        log.info("%s-side neighbours: %d rows, k=%d, %s, %.1f s", side, n, cfg.k, method, timings[f"{side}_s"])

    if rank != 0:  # every process holds the same table; the first one writes it
        return json_path
    # neighbors.json goes first (removed) and last (written): arrays without it are never trusted.
    json_path.unlink(missing_ok=True)
    for key, name in NEIGHBOR_FILES.items():
        atomic_save_npy(bank_dir / name, results[key])
    info = {
        "format": FORMAT_VERSION,
        "method": method,
        **settings,
        "count": n,
        "bank_fingerprint": fingerprint,
        "timings": timings,
        "search": details,
        "mean_top1_score": {side: float(results[f"{side}_scores"][:, 0].mean()) for side in ("image", "text")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(json_path, info)
    shutil.rmtree(bank_dir / RESUME_DIR, ignore_errors=True)
    return json_path


# --------------------------------------------------------------------------- reading tables


class NeighborTable:
    """Memory-mapped neighbour tables of a bank: ``image[i]`` = p_i candidates, ``text[i]`` = q_i candidates."""

    def __init__(self, path: Path, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self.info = info
        self.image = arrays["image"]
        self.text = arrays["text"]
        self.image_scores = arrays["image_scores"]
        self.text_scores = arrays["text_scores"]

    @property
    def k(self) -> int:
        return int(self.image.shape[1])

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __repr__(self) -> str:
        return f"NeighborTable({self.path}, n={len(self)}, k={self.k}, method={self.info.get('method')})"

    def pick(self, index: torch.Tensor, top_k: int = 1, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, q) for a batch of sample indices: the nearest (top_k=1) or one of the first top_k, uniformly.

        Draws for p and q are independent; with a seeded ``generator`` they are reproducible.
        """
        if not 1 <= top_k <= self.k:
            raise ConfigError(f"neighbour top_k must lie in 1..{self.k} (the k stored in {self.path}), got {top_k}")
        rows = index.detach().cpu().numpy().astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"sample indices must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        if top_k == 1:
            cols_p = cols_q = np.zeros(rows.shape, dtype=np.int64)
        else:
            cols_p = torch.randint(0, top_k, rows.shape, generator=generator).numpy()
            cols_q = torch.randint(0, top_k, rows.shape, generator=generator).numpy()
        p = torch.from_numpy(np.asarray(self.image[rows, cols_p], dtype=np.int64))
        q = torch.from_numpy(np.asarray(self.text[rows, cols_q], dtype=np.int64))
        return p.to(index.device), q.to(index.device)


def load_neighbors(bank_dir: str | Path, expected_fingerprint: str | None = None) -> NeighborTable:
    """Open the neighbour tables of ``bank_dir`` (memory-mapped).

    The table must have been built from this bank: its fingerprint is compared with
    ``expected_fingerprint`` or, when None, with the bank's current manifest.
    """
    bank_dir = Path(bank_dir)
    info = _read_info(bank_dir)
    if info is None:
        raise DataError(
            f"no neighbour table in {bank_dir} (no {NEIGHBORS_JSON}); run clip-ping neighbors --banks {bank_dir}"
        )
    if info.get("format") != FORMAT_VERSION:
        raise DataError(
            f"{bank_dir / NEIGHBORS_JSON} is in table format {info.get('format')!r}, this version reads format "
            f"{FORMAT_VERSION}; re-run clip-ping neighbors --overwrite"
        )
    expected = expected_fingerprint if expected_fingerprint is not None else bank_fingerprint(bank_dir)
    if info.get("bank_fingerprint") != expected:
        raise DataError(
            f"neighbour table in {bank_dir} was built for another bank "
            f"(fingerprint {str(info.get('bank_fingerprint'))[:12]}, "
            f"bank {str(expected)[:12]}); re-run clip-ping neighbors --overwrite"
        )
    arrays = {}
    for key, name in NEIGHBOR_FILES.items():
        arrays[key] = _load_bank_array(bank_dir, name)
    n, k = int(info.get("count", -1)), int(info.get("k", -1))
    for key, arr in arrays.items():
        if arr.shape != (n, k):
            raise DataError(f"{bank_dir / NEIGHBOR_FILES[key]} has shape {arr.shape}, {NEIGHBORS_JSON} says ({n}, {k}); "
                            "re-run clip-ping neighbors --overwrite")
    return NeighborTable(bank_dir, info, arrays)
