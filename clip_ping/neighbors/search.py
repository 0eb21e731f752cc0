"""The search engine: each row's top-k inner-product neighbours among the other rows.

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
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConfigError, DataError

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
