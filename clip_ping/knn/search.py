"""The search engine: each row's top-k inner-product neighbours among the other rows.

METHOD.md: ``p_i = argmax_{j != i} a_i . a_j`` (image side, searched in bank A)
and ``q_i = argmax_{j != i} b_i . b_j`` (text side, searched in bank B). We keep
the top-k of each (best first) so that training can draw one of the first
``top_k`` ([choice]).

Search methods (`search_neighbors`)
-----------------------------------
``exact``  FAISS ``IndexFlatIP``, queries in blocks (memory stays bounded).
``fast``   exact: tiled matrix products over the upper triangle of the self-join
           (tiled.py; bf16 tiles on CUDA, fp32 on CPUs, where bf16 did not pay; ``tiles``),
           the bank streamed tile by tile from its memmap; each row's top-k is
           *certified* against the worst-case error of a tile score, and rows that
           are not are searched again (fp32 tiles after bf16 ones, then float64). So top-k equals the exact result
           (ties: the lower index first). Resumable per block (fast.py).
``ivf``    FAISS IVF-Flat (``nlist ~ 4 sqrt(N)``, ``nprobe`` = nlist / 16 lists searched): approximate.
``ivfpq``  FAISS IVF with 4-bit fast-scan PQ codes, then the best ``k_factor`` x fetched
           candidates re-scored from a float16 copy (``IVF{nlist},PQ{d/2}x4fs,Refine(SQfp16)``)
           and their order taken from float64 scores: approximate; nprobe = nlist / 4.
           The bank is added in chunks from its memmap (never copied whole to float32):
           about d / 4 + 2 d bytes a row. Recall@1 >= 0.99 at 1M x 384 (BENCHMARKS.md).
``hnsw``   FAISS HNSW graph: approximate.
``auto``   ``fast`` on a GPU at any size; on a CPU ``fast`` up to `AUTO_EXACT_MAX_ROWS`
           rows, ``ivfpq`` above.

Under torchrun every method spreads over the processes: ``fast`` by rows of tiles
(fast.py), the FAISS methods by blocks of query rows (each process builds the
index, searches every K-th block and sends it to the others); every process ends
with the same table.

Whatever the method, a neighbour is never the row itself, never a row of the
same duplicate group (identical image bytes / caption), never an invalid row
(an image that did not decode). Rows for which the first candidates are not
enough after these exclusions are searched again exactly.

The module is over 450 lines because every method shares the problem's setup, the
exclusions and the spreading over processes; the fast method's own parts are in fast.py and tiled.py.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..distributed import collective_device, rank_and_world, resolve_device
from ..environment import has_extra, require
from ..errors import ConfigError, DataError
from . import tiled
from .fast import FastSearch, open_store
from .tiled import TILE_PRECISIONS, exact_scores, exact_topk

log = logging.getLogger(__name__)

METHODS = ("auto", "exact", "fast", "ivf", "ivfpq", "hnsw")
# Rows per chunk when a bank is read or converted in one pass.
_CHUNK = 65536
# Above this many searchable rows "auto" switches (on a CPU) to IVF-PQ. An exact
# search costs N^2 d flops (half self-join): 500k x 384 is ~1e14, under an hour on
# two cores; at 1M, IVF-PQ at recall@1 0.996 was 3.9x faster than exact (BENCHMARKS.md).
AUTO_EXACT_MAX_ROWS = 500_000
# IVF-PQ: fetched candidates re-scored per result (FAISS's k_factor); fewer rows refuse PQ
# (its 16 centroids per sub-quantizer need training points).
DEFAULT_K_FACTOR = 32
MIN_PQ_ROWS = 256


# --------------------------------------------------------------------------- helpers


def set_faiss_threads() -> None:
    """FAISS (OpenMP) uses as many threads as torch, so one knob controls both (nothing to set without FAISS)."""
    if not has_extra("faiss-cpu"):
        return
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())


def _pick_device(device: str | None) -> torch.device:
    """This process's device: ``auto`` is ``cuda:LOCAL_RANK`` when CUDA is present (one GPU per torchrun process)."""
    return resolve_device(device or "auto")


def resolve_method(method: str, n_rows: int, device: str | torch.device = "cpu") -> str:
    """The concrete method for ``method`` (``auto`` -> fast/exact/ivf by size and hardware)."""
    if method not in METHODS:
        raise ConfigError(f"unknown neighbour search method {method!r}; one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    if torch.device(device).type == "cuda":
        return "fast"  # tiled products on the GPU: exact and faster than a CPU index at any size
    return "ivfpq" if n_rows > AUTO_EXACT_MAX_ROWS else "fast"


def default_nlist(n_rows: int) -> int:
    """IVF lists: ~4 sqrt(N), and at least ~39 training points per list (FAISS's advice)."""
    return int(max(1, min(round(4 * math.sqrt(n_rows)), n_rows // 39)))


def default_nprobe(nlist: int) -> int:
    """IVF lists probed per query: nlist / 16, at least 32.

    A fixed nprobe lets recall fall as nlist grows (90.8 % recall@1 at 1M rows with
    32 of 4,000 lists); a fixed share of the lists keeps it, at a cost that grows as N^2 / 16.
    """
    return int(min(nlist, max(32, round(nlist / 16))))


def default_nprobe_pq(nlist: int) -> int:
    """IVF-PQ lists probed per query: nlist / 4, at least 32.

    PQ scans a list ~8x faster than IVF-Flat but ranks coarsely, so it probes more:
    at 1M x 384 (4,000 lists, k_factor 32) nprobe 250 gave recall@1 0.978, 1,000 gave 0.996
    (BENCHMARKS.md, "Neighbour search at scale").
    """
    return int(min(nlist, max(32, round(nlist / 4))))


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
        if valid is None:
            valid = np.ones(n, dtype=bool)
        valid = np.asarray(valid, dtype=bool).reshape(-1)
        if valid.shape != (n,):
            raise DataError(f"valid must hold one flag per row ({n}), got shape {valid.shape}")
        # One streamed pass (a float16 memmap is never copied whole here): which rows are finite.
        finite = np.empty(n, dtype=bool)
        for start in range(0, n, _CHUNK):
            finite[start:start + _CHUNK] = np.isfinite(features[start:start + _CHUNK]).all(axis=1)
        if not finite[valid].all():
            bad = int(np.flatnonzero(valid & ~finite)[0])
            raise DataError(f"feature row {bad} holds NaN/inf but is marked valid; re-extract the bank")
        self.src, self.finite = features, finite
        self._x: torch.Tensor | None = None
        self._x_db: torch.Tensor | None = None

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
        self.all_db = self.n_db == n

        # Over-fetch: enough for the row itself plus a few duplicates; rarer, larger
        # groups are handled by re-searching the rows that come up short.
        extra = 0
        for col in range(groups.shape[1]):
            _, counts = np.unique(groups[:, col], return_counts=True)
            extra += int(counts.max()) - 1
        self.fetch = min(self.n_db, k + 1 + min(extra, 16))

    @property
    def x(self) -> torch.Tensor:
        """All rows as float32 (FAISS methods need them in RAM; the fast path streams instead)."""
        if self._x is None:
            # Convert in chunks: a float16 memmap becomes float32 without a float64 detour.
            x = np.empty(self.src.shape, dtype=np.float32)
            for start in range(0, self.n, _CHUNK):
                x[start:start + _CHUNK] = self.src[start:start + _CHUNK]
            x[~self.finite] = 0.0  # invalid rows still get neighbours; their features must not poison the products
            self._x = torch.from_numpy(x)
        return self._x

    @property
    def x_db(self) -> torch.Tensor:
        if self._x_db is None:
            self._x_db = self.x if self.all_db else self.x[self.db_rows_t]
        return self._x_db

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 features of sample rows (read from the source unless already in RAM)."""
        if self._x is not None:
            return self._x[idx]
        flat = idx.reshape(-1).numpy()
        if len(flat) == 0:
            return torch.empty(*idx.shape, self.src.shape[1])
        order = np.argsort(flat, kind="stable")  # sorted reads from a memmap
        out = np.empty((len(flat), self.src.shape[1]), dtype=np.float32)
        out[order] = self.src[flat[order]]
        out[~self.finite[flat]] = 0.0
        return torch.from_numpy(out).reshape(*idx.shape, -1)

    def db_slice(self, start: int, stop: int) -> torch.Tensor:
        """Database rows start:stop as float32 (a tile; contiguous reads when every row is valid)."""
        if self._x is None and self.all_db:
            return torch.from_numpy(np.asarray(self.src[start:stop], dtype=np.float32))
        return self.rows(self.db_rows_t[start:stop])

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
        """Exact (float64) top-k of the given rows with all exclusions applied (the fallback).

        Streams the database in tiles, 1,024 query rows at a time whatever N, so it
        always finds k neighbours when k exist, and says so when they do not.
        """
        out_i = torch.empty(len(rows), self.k, dtype=torch.int64)
        out_s = torch.empty(len(rows), self.k, dtype=torch.float32)
        local = torch.full((self.n,), -1, dtype=torch.int64)
        local[self.db_rows_t] = torch.arange(self.n_db)
        db_groups = self.groups[self.db_rows_t]
        tile = tiled.tile_rows(self.n_db)
        for start in range(0, len(rows), 1024):
            r = rows[start:start + 1024]
            top_s, top_j = exact_topk(self.rows(r), self.groups[r], local[r], self.db_slice, db_groups,
                                      self.n_db, self.k, tile)
            lacking = torch.isinf(top_s[:, -1]).nonzero().flatten()
            if len(lacking):
                bad = int(r[int(lacking[0])])
                eligible = int(torch.isfinite(top_s[int(lacking[0])]).sum())
                raise DataError(
                    f"row {bad} has only {eligible} eligible neighbours (valid rows outside its duplicate group), "
                    f"fewer than k={self.k}; lower k or exclude fewer duplicates"
                )
            out_i[start:start + len(r)] = self.db_rows_t[top_j]
            out_s[start:start + len(r)] = top_s.float()
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
    rows = torch.from_numpy(local.astype(np.int64, copy=False))
    return torch.where(rows >= 0, prob.db_rows_t[rows.clamp(min=0)], rows)


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


def _build_ivfpq(prob: _Problem, nprobe: int | None, k_factor: int, seed: int = 0) -> Any:
    """IVF + 4-bit fast-scan PQ + a re-scoring copy, filled chunk by chunk from the source rows."""
    import faiss

    if prob.n_db < MIN_PQ_ROWS:
        raise ConfigError(f"method ivfpq needs at least {MIN_PQ_ROWS} valid rows, got {prob.n_db}; use fast or exact")
    if k_factor < 1:
        raise ConfigError(f"k_factor must be at least 1, got {k_factor}")
    d = prob.src.shape[1]
    nlist = default_nlist(prob.n_db)
    m = d // 2 if d % 2 == 0 else d  # 2 dimensions per 4-bit code
    refine = "SQfp16" if prob.src.dtype == np.float16 else "Flat"  # a float16 bank is kept exactly
    index = faiss.index_factory(d, f"IVF{nlist},PQ{m}x4fs,Refine({refine})", faiss.METRIC_INNER_PRODUCT)
    n_train = min(prob.n_db, 40 * nlist)
    sample = np.sort(np.random.default_rng(seed).choice(prob.n_db, n_train, replace=False))
    index.train(np.ascontiguousarray(prob.rows(prob.db_rows_t[torch.from_numpy(sample)]).numpy()))
    for start in range(0, prob.n_db, _CHUNK):
        index.add(np.ascontiguousarray(prob.db_slice(start, min(prob.n_db, start + _CHUNK)).numpy()))
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = int(min(nlist, nprobe)) if nprobe else default_nprobe_pq(nlist)
    index.k_factor = float(k_factor)  # type: ignore[attr-defined]  # an IndexRefine (the factory's type is Index)
    return index


def _search_ivfpq(prob: _Problem, rows: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates from the index, re-scored in float64 and ordered (score, lower index) as the exact methods."""
    q = prob.rows(rows)
    _, local = state["index"].search(np.ascontiguousarray(q.numpy()), prob.fetch)
    cand = _to_samples(prob, local)
    scores = exact_scores(q, prob.rows(cand.clamp(min=0)))
    scores.masked_fill_(cand < 0, float("-inf"))
    scores, cand = tiled._ordered(scores, cand, prob.fetch)
    return cand, scores.float()


def _search_index(prob: _Problem, rows: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    index = state["index"]
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(state.get("ef_search", 64), 2 * prob.fetch)
    scores, local = index.search(prob.x[rows].numpy(), prob.fetch)
    return _to_samples(prob, local), torch.from_numpy(scores)


def _query_blocks(queries: torch.Tensor, block_size: int, k: int, search: Callable
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(positions, indices, scores, short) of query blocks; under torchrun each process searches every
    K-th block and sends it to the others, round by round, so all hold the same table."""
    starts = list(range(0, len(queries), block_size))
    rank, world = rank_and_world()
    for first in range(0, len(starts), world):
        round_starts = starts[first:first + world]
        mine = None
        if rank < len(round_starts):
            mine = search(queries[round_starts[rank]:round_starts[rank] + block_size])
        for owner, start in enumerate(round_starts):
            pos = torch.arange(start, min(start + block_size, len(queries)))
            if world > 1:
                found = _from_owner(mine if owner == rank else None, owner, len(pos), k)
            else:
                assert mine is not None
                found = mine
            yield pos, *found


def _from_owner(result: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, owner: int, n: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's (indices n x k, scores n x k, short n) as process ``owner`` found them, in every process."""
    import torch.distributed as dist

    dev = collective_device()
    empty = (torch.empty(n, k, dtype=torch.int64), torch.empty(n, k), torch.empty(n, dtype=torch.bool))
    out = []
    for part in (result or empty):
        buf = part.to(torch.uint8 if part.dtype == torch.bool else part.dtype).to(dev).contiguous()
        dist.broadcast(buf, src=owner)
        out.append(buf.cpu().to(part.dtype))
    return out[0], out[1], out[2]


def search_neighbors(
    features: np.ndarray,
    k: int,
    groups: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    method: str = "auto",
    block_size: int = 16384,
    nprobe: int | None = None,
    ef_search: int = 64,
    k_factor: int = DEFAULT_K_FACTOR,
    tiles: str = "auto",
    device: str | None = None,
    progress: bool = False,
    desc: str = "neighbours",
    stats: dict[str, Any] | None = None,
    query_rows: np.ndarray | None = None,
    resume_dir: str | Path | None = None,
    resume_key: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product neighbours of every row among the other rows.

    ``features``: N x d (cosine when rows are L2-normalised; a memmap is fine).
    ``groups``: N ids (or N x G, excluded if any column matches): rows sharing an id
    with row i are never its neighbours. ``valid``: N flags; invalid rows are never
    neighbours (they still get neighbours). Returns ``(indices int64 N x k,
    scores float32 N x k)``, best first. ``stats`` (optional) receives the method
    used and counts of re-searched rows. ``query_rows`` searches only those rows
    (the result then has one row per query row; e.g. to measure recall on a sample).
    ``resume_dir`` (fast method, whole self-join): finished blocks are kept there, each
    written atomically, and a search killed at any point resumes from them; ``resume_key``
    names what the blocks belong to (e.g. the bank's fingerprint and the settings).
    ``k_factor`` (ivfpq): candidates re-scored per fetched row. ``tiles`` (fast): the precision
    of the score tiles, one of `TILE_PRECISIONS` (``auto``: bf16 where it is fast).
    """
    if block_size < 1:
        raise ConfigError(f"block_size must be at least 1, got {block_size}")
    if tiles not in TILE_PRECISIONS:
        raise ConfigError(f"tiles must be one of {', '.join(TILE_PRECISIONS)}, got {tiles!r}")
    set_faiss_threads()
    dev = _pick_device(device)
    prob = _Problem(np.asarray(features), k, groups, valid)
    chosen = resolve_method(method, prob.n_db, dev)
    if chosen != "fast":  # the tiled products need torch only (a GPU node may hold no FAISS build)
        require("faiss-cpu")
    t0 = time.perf_counter()

    fast = None
    state: dict[str, Any] = {"ef_search": ef_search}
    if chosen == "fast":
        fast = FastSearch(prob, dev, tiles)
        search: Callable = fast.rows
    elif chosen == "exact":
        search = lambda rows: prob.keep_first_k(rows, *_search_exact(prob, rows, state))  # noqa: E731
    elif chosen == "ivfpq":
        state["index"] = _build_ivfpq(prob, nprobe, k_factor)
        search = lambda rows: prob.keep_first_k(rows, *_search_ivfpq(prob, rows, state))  # noqa: E731
    else:
        state["index"] = _build_ivf(prob, nprobe) if chosen == "ivf" else _build_hnsw(prob)
        search = lambda rows: prob.keep_first_k(rows, *_search_index(prob, rows, state))  # noqa: E731
    t_index = time.perf_counter() - t0

    queries = torch.arange(prob.n) if query_rows is None else torch.from_numpy(np.asarray(query_rows, dtype=np.int64))
    if len(queries) and (int(queries.min()) < 0 or int(queries.max()) >= prob.n):
        raise DataError(f"query_rows must lie in [0, {prob.n})")

    def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(positions in queries, indices, scores, short) block by block."""
        if fast is not None and query_rows is None:  # the whole self-join: symmetric tiles
            resume = open_store(Path(resume_dir), fast.spec(resume_key)) if resume_dir is not None else None
            yield from fast.all_rows(resume)
            return
        yield from _query_blocks(queries, block_size, k, search)

    out_i = np.empty((len(queries), k), dtype=np.int64)
    out_s = np.empty((len(queries), k), dtype=np.float32)
    redo: list[torch.Tensor] = []  # positions (in queries) of rows to search again
    with _progress(len(queries), desc, progress) as bar:
        for pos, idx, sc, short in blocks():
            out_i[pos.numpy()] = idx.numpy()
            out_s[pos.numpy()] = sc.numpy()
            if short.any():
                redo.append(pos[short])
            bar.update(len(pos))

    # Rows that came up short (large duplicate groups, uncertified fast rows, an
    # approximate index that missed): exact float64 search with the exclusions masked.
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
            "rows_researched": n_redo + (fast.researched if fast is not None else 0), "index_s": round(t_index, 3),
            "search_s": round(time.perf_counter() - t0, 3),
        })
        if fast is not None:
            stats["fast_uncertified_rows"] = fast.uncertified
            stats["fast_float64_rows"] = fast.float64_rows
            stats["blocks_resumed"] = fast.resumed
            stats["tiles"] = "bf16" if fast.engine.dtype == torch.bfloat16 else "fp32"
        if chosen in ("ivf", "ivfpq"):
            import faiss

            ivf = faiss.extract_index_ivf(state["index"])
            stats["nlist"], stats["nprobe"] = int(ivf.nlist), int(ivf.nprobe)
            if chosen == "ivfpq":
                stats["k_factor"] = k_factor
    return out_i, out_s
