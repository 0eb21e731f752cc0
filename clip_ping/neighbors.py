"""Stage 1b: each sample's nearest neighbours in the teacher feature banks.

METHOD.md: ``p_i = argmax_{j != i} a_i . a_j`` (image side, searched in bank A)
and ``q_i = argmax_{j != i} b_i . b_j`` (text side, searched in bank B). We keep
the top-k of each (best first) so that training can draw one of the first
``top_k`` ([choice]).

Search methods (`search_neighbors`)
-----------------------------------
``exact``  FAISS ``IndexFlatIP``, queries in blocks (memory stays bounded).
``fast``   exact-quality: candidates from a bf16 matrix product (AMX / AVX512-BF16
           or a GPU), then an fp32 re-rank of a few extra candidates. Each row is
           *certified*: the k-th re-ranked score must beat every non-candidate
           even under the worst-case bf16 rounding error; rows that are not
           certified are recomputed in fp32. So top-k equals the exact result.
``ivf``    FAISS IVF-Flat (``nlist ~ 4 sqrt(N)``, ``nprobe`` lists searched): approximate.
``hnsw``   FAISS HNSW graph: approximate.
``auto``   ``fast`` (or ``exact`` when bf16 is not fast here) up to
           `AUTO_EXACT_MAX_ROWS` rows, ``ivf`` above.

Whatever the method, a neighbour is never the row itself, never a row of the
same duplicate group (identical image bytes / caption), never an invalid row
(an image that did not decode). Rows for which the first candidates are not
enough after these exclusions are searched again exactly.

Files (in the bank folder, see DEVELOPERS.md): ``neighbors_image.npy`` and
``neighbors_text.npy`` (int64 N x k), ``neighbors_image_scores.npy`` and
``neighbors_text_scores.npy`` (float32 N x k), ``neighbors.json`` (written last).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import option
from .errors import ConfigError, DataError
from .io import atomic_save_npy, atomic_write_json

log = logging.getLogger(__name__)

METHODS = ("auto", "exact", "fast", "ivf", "hnsw")
# Above this many searchable rows "auto" switches to IVF. An exact-quality
# search costs 2 N^2 d flops: 500k x 384 is ~1.9e14, a few minutes with bf16 on
# two cores, while 1M would take ~4x that; IVF stays within minutes at 1M+.
AUTO_EXACT_MAX_ROWS = 500_000
# Budget for one block of bf16 scores in the fast path (queries x database rows).
FAST_TILE_BYTES = 1 << 30
# Extra candidates re-ranked in fp32 by the fast path, beyond k + exclusions.
FAST_MARGIN = 32
# Score entries per block of the exact fp32 fallback (rows x N floats, plus masks).
_FALLBACK_ENTRIES = 1 << 26
FORMAT_VERSION = 1

NEIGHBOR_FILES = {
    "image": "neighbors_image.npy",
    "text": "neighbors_text.npy",
    "image_scores": "neighbors_image_scores.npy",
    "text_scores": "neighbors_text_scores.npy",
}
NEIGHBORS_JSON = "neighbors.json"


# --------------------------------------------------------------------------- helpers


def set_faiss_threads() -> None:
    """FAISS (OpenMP) uses as many threads as torch, so one knob controls both."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())


def bf16_matmul_is_fast(device: str | torch.device = "cpu") -> bool:
    """Whether a bf16 matrix product beats fp32 here: CUDA, or a CPU with AMX / AVX512-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_method(method: str, n_rows: int, device: str | torch.device = "cpu") -> str:
    """The concrete method for ``method`` (``auto`` -> fast/exact/ivf by size and hardware)."""
    if method not in METHODS:
        raise ConfigError(f"unknown neighbour search method {method!r}; one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    if n_rows > AUTO_EXACT_MAX_ROWS:
        return "ivf"
    return "fast" if bf16_matmul_is_fast(device) else "exact"


def default_nlist(n_rows: int) -> int:
    """IVF lists: ~4 sqrt(N), and at least ~39 training points per list (FAISS's advice)."""
    return int(max(1, min(round(4 * math.sqrt(n_rows)), n_rows // 39)))


def default_nprobe(nlist: int) -> int:
    """IVF lists probed per query: 32 (IVF scans ~32 N / nlist rows per query, so cost grows as N^1.5)."""
    return int(min(nlist, 32))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- search


class _Problem:
    """Everything the search methods share: features, database rows, exclusion groups."""

    def __init__(self, features: np.ndarray, k: int, groups: np.ndarray | None, valid: np.ndarray | None) -> None:
        if features.ndim != 2:
            raise DataError(f"features must be a 2-D array (N x d), got shape {features.shape}")
        n = features.shape[0]
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        self.n, self.k = n, k
        # Convert in chunks: a float16 memmap becomes float32 without a float64 detour.
        x = np.empty(features.shape, dtype=np.float32)
        for start in range(0, n, 65536):
            x[start:start + 65536] = features[start:start + 65536]
        if valid is None:
            valid = np.ones(n, dtype=bool)
        valid = np.asarray(valid, dtype=bool).reshape(-1)
        if valid.shape != (n,):
            raise DataError(f"valid must hold one flag per row ({n}), got shape {valid.shape}")
        finite = np.isfinite(x).all(axis=1)
        if not finite[valid].all():
            bad = int(np.flatnonzero(valid & ~finite)[0])
            raise DataError(f"feature row {bad} holds NaN/inf but is marked valid; re-extract the bank")
        x[~finite] = 0.0  # invalid rows still get neighbours; their features must not poison the products
        self.x = torch.from_numpy(x)

        # Groups as N x G: a candidate is excluded when any column matches (or it is the row itself).
        if groups is None:
            groups = np.arange(n, dtype=np.int64)
        groups = np.array(groups, dtype=np.int64)  # a copy: bank arrays are read-only memmaps
        if groups.ndim == 1:
            groups = groups[:, None]
        if groups.ndim != 2 or groups.shape[0] != n:
            raise DataError(f"groups must have one id per row ({n}), got shape {groups.shape}")
        self.groups = torch.from_numpy(np.ascontiguousarray(groups))

        self.db_rows = np.flatnonzero(valid).astype(np.int64)  # database row -> sample index
        self.n_db = len(self.db_rows)
        if self.n_db - 1 < k:
            raise DataError(
                f"cannot find k={k} neighbours: only {self.n_db} valid rows (a row is never its own neighbour); lower k"
            )
        self.db_rows_t = torch.from_numpy(self.db_rows)
        self.x_db = self.x[self.db_rows_t] if self.n_db < n else self.x

        # Over-fetch: enough for the row itself plus a few duplicates; rarer, larger
        # groups are handled by re-searching the rows that come up short.
        extra = 0
        for col in range(groups.shape[1]):
            _, counts = np.unique(groups[:, col], return_counts=True)
            extra += int(counts.max()) - 1
        self.fetch = min(self.n_db, k + 1 + min(extra, 16))

    def keep_first_k(self, rows: torch.Tensor, cand: torch.Tensor, scores: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drop excluded candidates (sorted best first), keep k per row.

        ``rows`` are sample indices (B), ``cand`` sample indices (B x C, -1 = none).
        Returns (indices B x k, scores B x k, mask of rows that have fewer than k left).
        """
        ok = cand >= 0
        safe = cand.clamp(min=0)
        same = (self.groups[safe] == self.groups[rows][:, None, :]).any(dim=2) | (safe == rows[:, None])
        ok &= ~same
        # Stable order: eligible candidates first, in their original (best-first) order.
        order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, : self.k]
        idx = torch.gather(cand, 1, order)
        sc = torch.gather(scores, 1, order)
        short = ~torch.gather(ok, 1, order).all(dim=1)
        return idx, sc, short

    def exact_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact fp32 top-k of the given rows with all exclusions applied (the fallback).

        Each block is rows x N_db scores with excluded entries masked, so it always
        finds k neighbours when k exist, and says so when they do not.
        """
        out_i = torch.empty(len(rows), self.k, dtype=torch.int64)
        out_s = torch.empty(len(rows), self.k, dtype=torch.float32)
        db_groups = self.groups[self.db_rows_t]
        step = max(1, min(1024, _FALLBACK_ENTRIES // self.n_db))
        for start in range(0, len(rows), step):
            r = rows[start:start + step]
            s = self.x[r] @ self.x_db.T
            excluded = (db_groups[None, :, :] == self.groups[r][:, None, :]).any(dim=2)
            excluded |= self.db_rows_t[None, :] == r[:, None]
            s.masked_fill_(excluded, float("-inf"))
            top_s, top_j = s.topk(self.k, dim=1)
            lacking = torch.isinf(top_s[:, -1]).nonzero().flatten()
            if len(lacking):
                first = int(lacking[0])
                bad, eligible = int(r[first]), int((~excluded[first]).sum())
                raise DataError(
                    f"row {bad} has only {eligible} eligible neighbours (valid rows outside its duplicate group), "
                    f"fewer than k={self.k}; lower k or exclude fewer duplicates"
                )
            out_i[start:start + len(r)] = self.db_rows_t[top_j]
            out_s[start:start + len(r)] = top_s
        return out_i, out_s


def _search_exact(prob: _Problem, rows: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if "index" not in state:
        import faiss

        index = faiss.IndexFlatIP(prob.x.shape[1])
        index.add(prob.x_db.numpy())
        state["index"] = index
    scores, local = state["index"].search(prob.x[rows].numpy(), prob.fetch)
    return _to_samples(prob, local), torch.from_numpy(scores)


def _to_samples(prob: _Problem, local: np.ndarray) -> torch.Tensor:
    """FAISS row numbers (-1 = none) -> sample indices (-1 kept)."""
    local = torch.from_numpy(local.astype(np.int64, copy=False))
    return torch.where(local >= 0, prob.db_rows_t[local.clamp(min=0)], local)


def _build_ivf(prob: _Problem, nprobe: int | None, seed: int = 0) -> Any:
    import faiss

    d = prob.x.shape[1]
    nlist = default_nlist(prob.n_db)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    # k-means on a sample: 40 points per list (FAISS warns below 39) keeps training cheap at 1M rows.
    n_train = min(prob.n_db, 40 * nlist)
    sample = np.random.default_rng(seed).choice(prob.n_db, n_train, replace=False) if n_train < prob.n_db else None
    train = prob.x_db.numpy() if sample is None else prob.x_db.numpy()[np.sort(sample)]
    index.train(np.ascontiguousarray(train))
    index.add(prob.x_db.numpy())
    index.nprobe = int(min(nlist, nprobe)) if nprobe else default_nprobe(nlist)
    return index


def _build_hnsw(prob: _Problem, m: int = 32, ef_construction: int = 80) -> Any:
    import faiss

    index = faiss.IndexHNSWFlat(prob.x.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(prob.x_db.numpy())
    return index


def _search_index(prob: _Problem, rows: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    index = state["index"]
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(state.get("ef_search", 64), 2 * prob.fetch)
    scores, local = index.search(prob.x[rows].numpy(), prob.fetch)
    return _to_samples(prob, local), torch.from_numpy(scores)


class _FastSearch:
    """bf16 candidates + certified fp32 re-rank (see the module docstring)."""

    def __init__(self, prob: _Problem, device: torch.device, margin: int | None = None) -> None:
        self.prob, self.device = prob, device
        margin = FAST_MARGIN if margin is None else margin
        x_db = prob.x_db.to(device)
        self.db_bf16 = x_db.to(torch.bfloat16)
        self.db_f32 = x_db
        self.n_cand = min(prob.n_db, prob.fetch + margin)
        # Worst-case error of a bf16 score against fp32 (module docstring). With q = qb + qr
        # and x = xb + xr (bf16 part + rest): q.x - qb.xb = qr.x + qb.xr, bounded per query by
        # |qr| max|x| + |qb| max|xr|; plus fp32 accumulation and the rounding of the bf16 output.
        resid = (x_db - self.db_bf16.float()).norm(dim=1)
        self.db_norm_max = float(x_db.norm(dim=1).max())
        self.db_resid_max = float(resid.max())
        self.db_bf16_norm_max = float(self.db_bf16.float().norm(dim=1).max())
        self.d = x_db.shape[1]
        self.uncertified = 0

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prob, dev = self.prob, self.device
        q = prob.x[rows].to(dev)
        qb = q.to(torch.bfloat16)
        # Candidates: top n_cand by bf16 score, over database chunks that fit the tile budget.
        chunk = max(self.n_cand, FAST_TILE_BYTES // (2 * len(rows)))
        cand_s, cand_j = [], []
        for start in range(0, prob.n_db, chunk):
            s = qb @ self.db_bf16[start:start + chunk].T
            top_s, top_j = s.topk(min(self.n_cand, s.shape[1]), dim=1)
            cand_s.append(top_s)
            cand_j.append(top_j + start)
        top_s, top_j = torch.cat(cand_s, 1), torch.cat(cand_j, 1)
        if len(cand_s) > 1:
            top_s, pos = top_s.topk(self.n_cand, dim=1)
            top_j = torch.gather(top_j, 1, pos)
        # Exact fp32 scores of the candidates, sorted best first.
        exact = torch.einsum("bd,bcd->bc", q, self.db_f32[top_j])
        exact, order = exact.sort(dim=1, descending=True)
        cand = prob.db_rows_t[torch.gather(top_j, 1, order).cpu()]
        idx, sc, short = prob.keep_first_k(rows, cand, exact.cpu())

        # Certification: any non-candidate has bf16 score <= last, so its exact score is
        # below last + err. Rows whose k-th score does not clear that are not trusted.
        if self.n_cand < prob.n_db:
            last = top_s[:, -1].float().cpu()
            qr = (q - qb.float()).norm(dim=1).cpu()
            qb_norm = qb.float().norm(dim=1).cpu()
            err = (qr * self.db_norm_max + qb_norm * self.db_resid_max
                   + self.d * 2.0**-23 * qb_norm * self.db_bf16_norm_max  # fp32 accumulation
                   + 2.0**-8 * (last.abs() + 1e-3))  # rounding of the bf16 output (relative 2^-8)
            uncertain = sc[:, -1] < last + err
            self.uncertified += int((uncertain & ~short).sum())
            short |= uncertain
        return idx, sc, short


def search_neighbors(
    features: np.ndarray,
    k: int,
    groups: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    method: str = "auto",
    block_size: int = 16384,
    nprobe: int | None = None,
    ef_search: int = 64,
    device: str | None = None,
    progress: bool = False,
    desc: str = "neighbours",
    stats: dict[str, Any] | None = None,
    query_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product neighbours of every row among the other rows.

    ``features``: N x d (cosine when rows are L2-normalised; a memmap is fine).
    ``groups``: N ids (or N x G, excluded if any column matches): rows sharing an id
    with row i are never its neighbours. ``valid``: N flags; invalid rows are never
    neighbours (they still get neighbours). Returns ``(indices int64 N x k,
    scores float32 N x k)``, best first. ``stats`` (optional) receives the method
    used and counts of re-searched rows. ``query_rows`` searches only those rows
    (the result then has one row per query row; e.g. to measure recall on a sample).
    """
    if block_size < 1:
        raise ConfigError(f"block_size must be at least 1, got {block_size}")
    set_faiss_threads()
    dev = _pick_device(device)
    prob = _Problem(np.asarray(features), k, groups, valid)
    chosen = resolve_method(method, prob.n_db, dev)
    t0 = time.perf_counter()

    fast = None
    state: dict[str, Any] = {"ef_search": ef_search}
    if chosen == "fast":
        fast = _FastSearch(prob, dev)
        # keep the bf16 score tile near FAST_TILE_BYTES: fewer query rows when N is large
        block_size = max(64, min(block_size, FAST_TILE_BYTES // (2 * max(prob.n_db, 1))))
        search: Callable = fast
    elif chosen == "exact":
        search = lambda rows: prob.keep_first_k(rows, *_search_exact(prob, rows, state))  # noqa: E731
    else:
        state["index"] = _build_ivf(prob, nprobe) if chosen == "ivf" else _build_hnsw(prob)
        search = lambda rows: prob.keep_first_k(rows, *_search_index(prob, rows, state))  # noqa: E731
    t_index = time.perf_counter() - t0

    queries = torch.arange(prob.n) if query_rows is None else torch.from_numpy(np.asarray(query_rows, dtype=np.int64))
    if len(queries) and (int(queries.min()) < 0 or int(queries.max()) >= prob.n):
        raise DataError(f"query_rows must lie in [0, {prob.n})")
    out_i = np.empty((len(queries), k), dtype=np.int64)
    out_s = np.empty((len(queries), k), dtype=np.float32)
    redo: list[torch.Tensor] = []  # positions (in queries) of rows to search again
    with _progress(len(queries), desc, progress) as bar:
        for start in range(0, len(queries), block_size):
            rows = queries[start:start + block_size]
            idx, sc, short = search(rows)
            out_i[start:start + len(rows)] = idx.numpy()
            out_s[start:start + len(rows)] = sc.numpy()
            if short.any():
                redo.append(start + torch.nonzero(short).flatten())
            bar.update(len(rows))

    # Rows that came up short (large duplicate groups, uncertified fast rows, an
    # approximate index that missed): exact fp32 search with the exclusions masked.
    n_redo = 0
    if redo:
        pos = torch.cat(redo)
        n_redo = len(pos)
        idx, sc = prob.exact_rows(queries[pos])
        out_i[pos.numpy()] = idx.numpy()
        out_s[pos.numpy()] = sc.numpy()
    if stats is not None:
        stats.update({
            "method": chosen, "rows": prob.n, "queries": len(queries), "database_rows": prob.n_db, "fetch": prob.fetch,
            "rows_researched": n_redo, "index_s": round(t_index, 3),
            "search_s": round(time.perf_counter() - t0, 3),
        })
        if fast is not None:
            stats["fast_uncertified_rows"] = fast.uncertified
        if "index" in state and hasattr(state["index"], "nprobe"):
            stats["nlist"], stats["nprobe"] = int(state["index"].nlist), int(state["index"].nprobe)
    return out_i, out_s


# --------------------------------------------------------------------------- stage: build tables


@dataclass
class NeighborsConfig:
    """Options of `clip-ping neighbors`."""

    banks: str = option("", "feature bank folder written by clip-ping extract (neighbour files are written into it)")
    k: int = option(10, "neighbours kept per sample, best first")
    method: str = option(
        "auto", f"search method: exact (FAISS), fast (bf16 + exact re-rank), ivf, hnsw (approximate); "
        f"auto = fast/exact up to {AUTO_EXACT_MAX_ROWS:,} rows, ivf above", choices=METHODS)
    exclude: str = option(
        "both", "duplicates that are never neighbours: both (same image bytes or same caption), "
        "same_side (same image for image-side, same caption for text-side), self (only the sample itself)",
        choices=("both", "same_side", "self"))
    nprobe: int = option(0, "IVF lists searched per query (0: automatic, 32); more is slower and more exact")
    block_size: int = option(16384, "query rows per search block (bounds memory)")
    device: str = option("auto", "device of the fast method: auto, cpu, cuda")
    overwrite: bool = option(False, "rebuild the neighbour files even when up to date")
    progress: bool = option(True, "progress bars")

    def validate(self) -> None:
        if not self.banks:
            raise ConfigError("neighbors needs --banks (the feature bank folder written by clip-ping extract)")
        if self.k < 1:
            raise ConfigError("config key 'k' must be at least 1")
        if self.block_size < 1:
            raise ConfigError("config key 'block_size' must be at least 1")
        if self.nprobe < 0:
            raise ConfigError("config key 'nprobe' must be 0 (automatic) or more")
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
    cfg.validate()
    bank_dir = Path(cfg.banks)
    if not bank_dir.is_dir():
        raise DataError(f"bank folder not found: {bank_dir}")
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
                "nprobe": cfg.nprobe if method == "ivf" else None}
    json_path = bank_dir / NEIGHBORS_JSON
    old = _read_info(bank_dir)
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
            nprobe=cfg.nprobe or None, device=cfg.device, progress=cfg.progress, desc=f"{side}-side neighbours",
            stats=stats,
        )
        timings[f"{side}_s"] = round(time.perf_counter() - t0, 3)
        results[side], results[f"{side}_scores"] = idx, scores
        details[side] = stats
        log.info("%s-side neighbours: %d rows, k=%d, %s, %.1f s", side, n, cfg.k, method, timings[f"{side}_s"])

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


# --------------------------------------------------------------------------- queue variant


class NeighborQueue:
    """METHOD.md "queue neighbours": search p_i / q_i among recent samples instead of the data set.

    A FIFO of the last ``size`` samples' teacher features (keys: image a_j and text b_j)
    and their sample indices. ``query`` returns, per sample, the index of the queued
    sample with the most similar image key (p) and text key (q), never the sample
    itself. With ``include_batch`` the current batch is searched too, so the very
    first step already has neighbours. A sample with no candidate at all (empty
    queue and a batch of one) gets itself.
    """

    def __init__(self, size: int, image_dim: int, text_dim: int, include_batch: bool = True) -> None:
        if size < 1:
            raise ConfigError(f"queue size must be at least 1, got {size}")
        self.size = size
        self.include_batch = include_batch
        self.image_keys = torch.zeros(size, image_dim)
        self.text_keys = torch.zeros(size, text_dim)
        self.indices = torch.full((size,), -1, dtype=torch.int64)  # -1 = empty slot
        self.ptr = 0  # next slot to write

    def __len__(self) -> int:
        return int((self.indices >= 0).sum())

    @torch.no_grad()
    def push(self, index: torch.Tensor, image_keys: torch.Tensor, text_keys: torch.Tensor) -> None:
        """Append a batch (oldest entries are overwritten)."""
        index = index.detach().cpu().long()[-self.size:]
        a = _normalize_rows(image_keys.detach().cpu().float()[-self.size:])
        b = _normalize_rows(text_keys.detach().cpu().float()[-self.size:])
        slots = (self.ptr + torch.arange(len(index))) % self.size
        self.image_keys[slots], self.text_keys[slots], self.indices[slots] = a, b, index
        self.ptr = int((self.ptr + len(index)) % self.size)

    @torch.no_grad()
    def query(self, index: torch.Tensor, image_keys: torch.Tensor, text_keys: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, q): sample indices of the nearest queued sample by image key and by text key."""
        index = index.detach().cpu().long()
        a = _normalize_rows(image_keys.detach().cpu().float())
        b = _normalize_rows(text_keys.detach().cpu().float())
        p = self._nearest(index, a, self.image_keys, a)
        q = self._nearest(index, b, self.text_keys, b)
        return p.to(image_keys.device), q.to(image_keys.device)

    def _nearest(self, index: torch.Tensor, keys: torch.Tensor, queued: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        cand_keys, cand_idx = queued, self.indices
        if self.include_batch:
            cand_keys, cand_idx = torch.cat([queued, batch]), torch.cat([self.indices, index])
        scores = keys @ cand_keys.T
        excluded = (cand_idx[None, :] < 0) | (cand_idx[None, :] == index[:, None])
        scores.masked_fill_(excluded, float("-inf"))
        best_s, best = scores.max(dim=1)
        return torch.where(torch.isinf(best_s), index, cand_idx[best])

    def state_dict(self) -> dict[str, Any]:
        return {"image_keys": self.image_keys.clone(), "text_keys": self.text_keys.clone(),
                "indices": self.indices.clone(), "ptr": self.ptr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["image_keys"].shape) != tuple(self.image_keys.shape) or \
                tuple(state["text_keys"].shape) != tuple(self.text_keys.shape):
            raise ConfigError("the checkpoint's neighbour queue has another size or key dimension than this run")
        self.image_keys.copy_(state["image_keys"])
        self.text_keys.copy_(state["text_keys"])
        self.indices.copy_(state["indices"])
        self.ptr = int(state["ptr"])


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


# `clip-ping neighbors show` lives in neighbors_show.py (HTML page, label agreement); re-exported for the CLI.
from .neighbors_show import ShowConfig, show_neighbors, write_neighbor_page  # noqa: E402,F401
