"""Exact top-k by tiled matrix products (the ``fast`` method; CPU or CUDA, same code).

The self-join is symmetric: the score tile of row block I against row block J
is the transpose of J against I. So only the upper triangle of tiles (J >= I) is
multiplied, and each tile serves both blocks: its rows give candidates to the
rows of I, its columns to the rows of J. That halves the matrix products.

Per tile, a full ``topk`` would cost a large share of the product. Each row
keeps its ``c`` best candidates so far; only tile entries above its c-th best
(its threshold) can enter, and after the first tile those are few. So a tile
costs one comparison pass per direction and a merge of the few survivors
(a plain ``topk`` only while a block has no threshold yet).

Exclusions (the row itself, its duplicate groups) are masked inside the tiles
(only tiles that share a group id are masked), so duplicate groups of any size
cost nothing extra. Invalid rows are not in the database.

Exactness: tile scores are approximate (fp32 summation order, or bf16 on CUDA
or when asked for). Each row's candidates are re-scored in
float64, ordered by (score, lower index) and *certified*: the k-th exact score
must beat the c-th candidate score plus the worst-case error of a tile score.
Rows that are not certified are searched again (`exact_rows`). So the result
equals a float64 brute force, ties broken by the lower index.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..environment import has_extra

# Bytes of one score tile (T x T fp32): 64 MiB keeps a tile and its group maxima
# near the last-level cache and makes each product large enough to run at peak.
FAST_TILE_BYTES = 1 << 26
# Columns of a block's first tile searched with a plain top-k, to set its thresholds.
HEAD = 1 << 30  # measured: a plain top-k of the whole first tile beats a head of 512 columns
# CPU: merge tiles with FAISS's heaps when FAISS is installed (False: the torch path, as on CUDA).
USE_FAISS_HEAPS = True
# Rows per group when a tile is read column-wise (see `_above`).
ROWS_PER_GROUP = 16
# Extra candidates beyond k: room for near-ties before a row must be re-searched.
# bf16 scores are ~2^-8 relative off, so more rows fall within the error bound of their
# k-th candidate: at 50k x 384 clustered rows, 8 left 12,782 rows uncertified (each then
# searched again exactly), 24 left 999, 56 left 1 but slowed the heaps (BENCHMARKS.md).
FAST_MARGIN = 8
FAST_MARGIN_BF16 = 24
TILE_PRECISIONS = ("auto", "fp32", "bf16")


def bf16_matmul_is_fast(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 score tiles beat fp32 here: on CUDA only.

    On CPUs the bf16 product is faster (AMX: 3.6x fp32), but the search is not: bf16 tiles
    come out rounded to 2^-8, so every row's candidates must be re-scored in float64 and
    more rows miss certification. Measured (BENCHMARKS.md): 100k x 384 on an AMX Xeon,
    86-87 CPU s against 65-68 with fp32 tiles; 50k on an AVX512-BF16 EPYC, 20.4 s against 14.7.
    """
    return torch.device(device).type == "cuda"


def tile_dtype(precision: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype of the score tiles: ``auto`` (bf16 on CUDA, else fp32), ``fp32`` or ``bf16``."""
    if precision not in TILE_PRECISIONS:
        from ..errors import ConfigError

        raise ConfigError(f"tile precision {precision!r} is not one of {', '.join(TILE_PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if bf16_matmul_is_fast(device) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def margin(dtype: torch.dtype) -> int:
    """Candidates kept beyond k for tiles of ``dtype``."""
    return FAST_MARGIN if dtype == torch.float32 else FAST_MARGIN_BF16


def tile_rows(n: int, tile_bytes: int | None = None) -> int:
    """Rows per tile: T x T fp32 scores within ``tile_bytes``."""
    t = int(((tile_bytes or FAST_TILE_BYTES) // 4) ** 0.5)
    return max(1, min(t, n))


def _above(s: torch.Tensor, theta: torch.Tensor, along_rows: bool) -> tuple[torch.Tensor, ...]:
    """Entries of ``s`` above the threshold of their row (column when ``along_rows``).

    Returns (target row, other position, value), grouped by target in increasing order.
    """
    h, w = s.shape
    s = s.contiguous()
    if not along_rows:
        flat = (s > theta[:, None]).view(-1).nonzero().squeeze(1)
        r, c_pos = flat // w, flat % w
        return r, c_pos, s.view(-1)[flat]
    if h % ROWS_PER_GROUP:
        flat = (s > theta[None, :]).T.contiguous().view(-1).nonzero().squeeze(1)
        r, c_pos = flat // h, flat % h
        return r, c_pos, s.view(-1)[c_pos * w + r]
    # Column direction: maxima of groups of rows (a cheap reduction across rows) first,
    # then only the groups above the threshold are read.
    g = h // ROWS_PER_GROUP
    gmax = s.view(g, ROWS_PER_GROUP, w).amax(dim=1).T.contiguous()  # w x g
    flat = (gmax > theta[:, None]).view(-1).nonzero().squeeze(1)
    col, grp = flat // g, flat % g
    rows = grp[:, None] * ROWS_PER_GROUP + torch.arange(ROWS_PER_GROUP, device=s.device)
    vals = s.view(-1)[rows * w + col[:, None]]
    keep = vals > theta[col][:, None]
    return col[:, None].expand_as(rows)[keep], rows[keep], vals[keep]


def _ptr(t: torch.Tensor) -> Any:
    import faiss

    return faiss.swig_ptr(t.numpy())


def _heaps(state: tuple[torch.Tensor, torch.Tensor], lo: int, n: int, c: int) -> Any:
    """FAISS min-heaps (best ``c`` by inner product) over rows lo:lo+n of the candidate state, in place."""
    import faiss

    h = faiss.float_minheap_array_t()
    h.nh, h.k = n, c
    h.val, h.ids = _ptr(state[0][lo:lo + n]), _ptr(state[1][lo:lo + n])
    return h


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T as float32 scores. On the CPU in fp32 through NumPy's BLAS (OpenBLAS, as FAISS
    uses), which runs this shape about 20 % faster than torch's MKL on AMD CPUs here."""
    with torch.profiler.record_function("neighbors.tile_product"):  # named in profiles (NumPy is not an op)
        if a.device.type == "cpu" and a.dtype == torch.float32:
            return torch.from_numpy(np.matmul(a.numpy(), b.numpy().T))
        return (a @ b.T).float()


class TiledCandidates:
    """Running top-``c`` candidates of query rows, fed by score tiles.

    ``load(start, stop)`` returns database rows ``start:stop`` as a float32 tensor on
    ``device`` (so a bank can be streamed from its memmap). ``groups`` (n_db x G,
    on ``device``) masks pairs that share an id in any column. ``dtype``: of the
    score tiles (default: bf16 where it is fast, else fp32).
    """

    def __init__(self, load: Callable[[int, int], torch.Tensor], n_db: int, d: int, groups: torch.Tensor,
                 c: int, device: torch.device, tile: int | None = None, dtype: torch.dtype | None = None) -> None:
        self.load, self.n_db, self.d, self.groups, self.device = load, n_db, d, groups, device
        self.c = min(c, n_db)
        self.tile = tile or tile_rows(n_db)
        self.n_blocks = -(-n_db // self.tile)
        self.dtype = dtype or tile_dtype("auto", device)
        # On the CPU, FAISS's own per-row heaps take the tile's entries (one compiled pass);
        # elsewhere (CUDA) the torch threshold path does (`_feed_torch`, also tested on the CPU).
        self.heaps = device.type == "cpu" and USE_FAISS_HEAPS and has_extra("faiss-cpu")
        self._block_ids = [self._unique_groups(b) for b in range(self.n_blocks)]
        # Error bound inputs (see `error_bound`), from one streamed pass over the database.
        self.x_norm_max = 0.0
        self.x_resid_max = 0.0
        self.xb_norm_max = 0.0
        for b in range(self.n_blocks):
            x = self.block(b)
            self.x_norm_max = max(self.x_norm_max, float(x.norm(dim=1).max()))
            if self.dtype != torch.float32:
                xb = x.to(self.dtype).float()
                self.x_resid_max = max(self.x_resid_max, float((x - xb).norm(dim=1).max()))
                self.xb_norm_max = max(self.xb_norm_max, float(xb.norm(dim=1).max()))

    def span(self, b: int) -> tuple[int, int]:
        return b * self.tile, min(self.n_db, (b + 1) * self.tile)

    def block(self, b: int) -> torch.Tensor:
        return self.load(*self.span(b))

    def _unique_groups(self, b: int) -> list[torch.Tensor]:
        lo, hi = self.span(b)
        return [torch.unique(self.groups[lo:hi, col]) for col in range(self.groups.shape[1])]

    def _shares_group(self, bi: int, bj: int) -> bool:
        if bi == bj:  # duplicates inside the block (the row itself is masked separately)
            lo, hi = self.span(bi)
            return any(len(u) < hi - lo for u in self._block_ids[bi])
        return any(bool(torch.isin(a, b).any()) for a, b in zip(self._block_ids[bi], self._block_ids[bj]))

    def _mask(self, s: torch.Tensor, gi: torch.Tensor, gj: torch.Tensor) -> None:
        same = gi[:, None, 0] == gj[None, :, 0]
        for col in range(1, gi.shape[1]):
            same |= gi[:, None, col] == gj[None, :, col]
        s.masked_fill_(same, float("-inf"))

    def _new_state(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.full((n, self.c), float("-inf"), device=self.device),
                torch.full((n, self.c), -1, dtype=torch.int64, device=self.device))

    def _feed(self, state: tuple[torch.Tensor, torch.Tensor], lo: int, s: torch.Tensor, col0: int,
              along_rows: bool = False) -> None:
        """Merge tile ``s`` into the candidates of rows ``lo:`` (its rows; its columns when ``along_rows``)."""
        if self.heaps:
            t = s.T.contiguous() if along_rows else s.contiguous()
            _heaps(state, lo, t.shape[0], self.c).addn(t.shape[1], _ptr(t), col0, 0, t.shape[0])
        else:
            self._feed_torch(state, lo, s, col0, along_rows)

    def _sorted(self, state: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates of rows lo:hi, best first (-inf / -1 where there are none)."""
        v, i = state[0][lo:hi], state[1][lo:hi]
        if self.heaps:
            _heaps(state, lo, hi - lo, self.c).reorder()
            v.masked_fill_(i < 0, float("-inf"))
        return v.clone(), i.clone()

    def _feed_torch(self, state: tuple[torch.Tensor, torch.Tensor], lo: int, s: torch.Tensor, col0: int,
                    along_rows: bool = False) -> None:
        """The torch version of `_feed` (any device): per-row thresholds, survivors merged."""
        n = s.shape[1] if along_rows else s.shape[0]
        cur_v, cur_i = state[0][lo:lo + n], state[1][lo:lo + n]
        if torch.isinf(cur_v[:, -1]).any():  # no threshold yet: a plain top-k of the tile's head sets one
            head = max(self.c, HEAD)
            t = s[:head].T if along_rows else s[:, :head]
            v, pos = t.topk(min(self.c, t.shape[1]), dim=1)
            new_v, new_i, rows = v, pos + col0, torch.arange(n, device=s.device)
            rest = s[head:] if along_rows else s[:, head:]
            if rest.numel():
                self._merge_rows(cur_v, cur_i, rows, new_v, new_i)
                self._feed_torch(state, lo, rest, col0 + head, along_rows)
                return
        else:  # only the entries above a row's c-th best can enter
            r, c_pos, vals = _above(s, cur_v[:, -1], along_rows)
            if len(r) == 0:
                return
            counts = torch.bincount(r, minlength=n)
            rows = counts.nonzero().flatten()
            slot = torch.cumsum(counts > 0, 0) - 1
            rank = torch.arange(len(r), device=s.device) - (torch.cumsum(counts, 0) - counts)[r]
            new_v = torch.full((len(rows), int(counts.max())), float("-inf"), device=s.device)
            new_i = torch.full(new_v.shape, -1, dtype=torch.int64, device=s.device)
            new_v[slot[r], rank] = vals.float()
            new_i[slot[r], rank] = c_pos + col0
        self._merge_rows(cur_v, cur_i, rows, new_v, new_i)

    def _merge_rows(self, cur_v: torch.Tensor, cur_i: torch.Tensor, rows: torch.Tensor, new_v: torch.Tensor,
                    new_i: torch.Tensor) -> None:
        v, pos = torch.cat([cur_v[rows], new_v.float()], 1).topk(self.c, dim=1)
        cur_v[rows] = v
        cur_i[rows] = torch.cat([cur_i[rows], new_i], 1).gather(1, pos)

    def self_join(self, done: set[int] | None = None
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Candidates of every database row: yields (block, values, db indices) as blocks finish, in order.

        Blocks in ``done`` (already finished, e.g. before a resume) are not yielded, but
        their tiles still feed the later blocks.
        """
        done = done or set()
        state = self.new_state()
        for bi in range(self.n_blocks):
            lo_i, hi_i = self.span(bi)
            self.tile_row(state, bi, done)
            if bi not in done:
                yield bi, *self._sorted(state, lo_i, hi_i)
                state[0][lo_i:hi_i], state[1][lo_i:hi_i] = float("-inf"), -1  # no longer needed

    def new_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty candidates (values, indices) of every database row."""
        return self._new_state(self.n_db)

    def tile_row(self, state: tuple[torch.Tensor, torch.Tensor], bi: int, done: set[int]) -> None:
        """Feed the tiles (bi, bj >= bi) into the candidates of the blocks not in ``done``.

        After the tile rows 0..b, block b has all its candidates: its row of tiles gave the
        tiles right of the diagonal, the earlier rows (their columns) the ones left of it.
        """
        if all(b in done for b in range(bi, self.n_blocks)):
            return
        lo_i, _ = self.span(bi)
        xi = self.block(bi).to(self.dtype)
        for bj in range(bi, self.n_blocks):
            if bi in done and bj in done:
                continue
            lo_j, _ = self.span(bj)
            s = self._tile(bi, bj, xi)
            if bi not in done:
                self._feed(state, lo_i, s, lo_j)
            if bj != bi and bj not in done:
                self._feed(state, lo_j, s, lo_i, along_rows=True)

    def sorted_candidates(self, state: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates of rows lo:hi, best first (-inf / -1 where there are none); they take no more tiles."""
        return self._sorted(state, lo, hi)

    def _tile(self, bi: int, bj: int, xi: torch.Tensor) -> torch.Tensor:
        """Scores of row block bi (``xi``, in the compute dtype) against row block bj, exclusions masked."""
        s = _product(xi, xi if bj == bi else self.block(bj).to(self.dtype))
        if bj == bi:
            s.fill_diagonal_(float("-inf"))  # a row is never its own neighbour
        if self._shares_group(bi, bj):
            lo_i, hi_i = self.span(bi)
            lo_j, hi_j = self.span(bj)
            self._mask(s, self.groups[lo_i:hi_i], self.groups[lo_j:hi_j])
        return s

    def merge_partials(self, values: list[torch.Tensor], indices: list[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-c of each row over several partial candidate lists (one per process).

        Under torchrun, tile row b is multiplied by process b mod K (`tile_row`), so each
        tile is computed once; the K partial candidates of a block merged are its candidates.
        """
        v, pos = torch.cat(values, 1).topk(self.c, dim=1)
        return v, torch.cat(indices, 1).gather(1, pos)

    def queries(self, q: torch.Tensor, q_groups: torch.Tensor, q_db: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates of arbitrary query rows ``q`` (float32 on the device) against the whole database.

        ``q_db``: each query's own database index (-1 when it is not a database row).
        """
        state = self._new_state(len(q))
        qx = q.to(self.dtype)
        for bj in range(self.n_blocks):
            lo_j, hi_j = self.span(bj)
            s = _product(qx, self.block(bj).to(self.dtype))
            self._mask(s, q_groups, self.groups[lo_j:hi_j])
            if q_db is not None:
                own = (q_db >= lo_j) & (q_db < hi_j)
                s[own.nonzero().flatten(), q_db[own] - lo_j] = float("-inf")
            self._feed(state, 0, s, lo_j)
        return self._sorted(state, 0, len(q))

    def error_bound(self, q: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Worst-case |tile score - exact score| per query row, against any database row.

        fp32: a sum of d products has error <= d 2^-24 |q| |x| whatever the order.
        bf16: with q = qb + qr and x = xb + xr (bf16 part + rest), q.x - qb.xb = qr.x + qb.xr,
        bounded by |qr| max|x| + |qb| max|xr|, plus fp32 accumulation and the rounding
        of the bf16 output (relative 2^-8, ``last`` is the score it is applied to).
        """
        if self.dtype == torch.float32:
            return 1.01 * self.d * 2.0**-24 * q.norm(dim=1) * self.x_norm_max + 1e-30
        qb = q.to(self.dtype).float()
        qr, qb_norm = (q - qb).norm(dim=1), qb.norm(dim=1)
        return (qr * self.x_norm_max + qb_norm * self.x_resid_max
                + self.d * 2.0**-23 * qb_norm * self.xb_norm_max + 2.0**-8 * (last.abs() + 1e-3))


def _ordered(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row by (value descending, index ascending): the tie rule of the search."""
    by_index = idx.argsort(dim=1)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    by_value = vals.argsort(dim=1, descending=True, stable=True)[:, :k]
    return vals.gather(1, by_value), idx.gather(1, by_value)


def _top_with_ties(s: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row of ``s`` by (value, lower column), columns numbered from ``offset``."""
    k = min(k, s.shape[1])
    vals, cols = s.topk(k, dim=1)
    cols = cols + offset
    # topk breaks ties at the k-th place arbitrarily: rows with more entries equal to the
    # k-th value (rare: identical rows outside a duplicate group) are redone one by one.
    tied = ((s >= vals[:, -1:]).sum(dim=1) > k) & torch.isfinite(vals[:, -1])
    for r in tied.nonzero().flatten().tolist():
        c = (s[r] >= vals[r, -1]).nonzero().flatten()
        v, i = _ordered(s[r, c][None], (c + offset)[None], k)
        vals[r], cols[r] = v[0], i[0]
    return _ordered(vals, cols, k)


def exact_topk(q: torch.Tensor, q_groups: torch.Tensor, q_db: torch.Tensor, load: Callable[[int, int], torch.Tensor],
               groups: torch.Tensor, n_db: int, k: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 top-k of query rows against the database, streamed in tiles, exclusions masked.

    The reference the certified search falls back to: exact scores, ties broken by the lower
    database index, memory bounded by one tile whatever N. Entries that do not exist
    (fewer than k eligible rows) come back as -inf.
    """
    q64 = q.double()
    best_v = torch.full((len(q), 0), float("-inf"), dtype=torch.float64, device=q.device)
    best_i = torch.full((len(q), 0), -1, dtype=torch.int64, device=q.device)
    for lo in range(0, n_db, tile):
        hi = min(n_db, lo + tile)
        s = q64 @ load(lo, hi).double().T
        same = q_groups[:, None, 0] == groups[None, lo:hi, 0]
        for col in range(1, q_groups.shape[1]):
            same |= q_groups[:, None, col] == groups[None, lo:hi, col]
        same |= q_db[:, None] == torch.arange(lo, hi, device=q.device)[None, :]
        s.masked_fill_(same, float("-inf"))
        v, i = _top_with_ties(s, k, lo)
        best_v, best_i = _ordered(torch.cat([best_v, v], 1), torch.cat([best_i, i], 1), k)
    return best_v, best_i


def exact_scores(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Float64 q_b . x_bc for a batch (B x d) and its candidates (B x c x d), summed in one fixed order."""
    return (q.double()[:, None, :] * x.double()).sum(dim=2)
