"""The ``fast`` method on a search problem: tiled candidates, certified top-k, resumable blocks.

`tiled.TiledCandidates` gives every row its candidates from the upper-triangle
tiles; `FastSearch.finish` turns them into the exact top-k (certified, or marked
for an exact re-search). Finished blocks can be kept on disk (`BlockStore`), one
atomic file per block, so a killed search resumes where it stopped and gives the
same bytes; under torchrun too (blocks finish in rounds of one tile row per
process, and process 0 writes them).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..distributed import collective_device, rank_and_world
from ..io import atomic_write, atomic_write_json
from . import tiled
from .tiled import TiledCandidates, exact_scores

BLOCK_FORMAT = 1
_BLOCK = re.compile(r"^block-(\d{6})\.npz$")


class BlockStore:
    """Finished blocks of one search in a folder: ``spec.json`` and ``block-NNNNNN.npz`` (indices, scores).

    Blocks of another search (another spec) are removed when the store opens, except by a
    reader (``writer=False``: the other processes of a torchrun search, which only load).
    """

    def __init__(self, folder: Path, spec: dict[str, Any], writer: bool = True) -> None:
        self.folder = folder
        if not writer:
            return
        folder.mkdir(parents=True, exist_ok=True)
        spec_path = folder / "spec.json"
        try:
            old = json.loads(spec_path.read_text()) if spec_path.is_file() else None
        except json.JSONDecodeError:
            old = None
        if old != spec:
            for f in folder.iterdir():
                if _BLOCK.match(f.name):
                    f.unlink()
            atomic_write_json(spec_path, spec)

    def done(self) -> set[int]:
        return {int(m.group(1)) for f in self.folder.iterdir() if (m := _BLOCK.match(f.name))}

    def load(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        with np.load(self.folder / f"block-{b:06d}.npz") as z:
            return torch.from_numpy(z["idx"]), torch.from_numpy(z["scores"])

    def save(self, b: int, idx: torch.Tensor, scores: torch.Tensor) -> None:
        atomic_write(self.folder / f"block-{b:06d}.npz",
                     lambda f: np.savez(f, idx=idx.numpy(), scores=scores.numpy()))
        _block_saved(b)


def open_store(folder: Path, spec: dict[str, Any]) -> tuple[BlockStore, set[int]]:
    """The block store of a search and its finished blocks, the same in every process.

    Under torchrun only process 0 cleans and writes the folder (it lies in the bank folder,
    which every process reads); the others wait for it, then take its list of finished blocks.
    """
    rank, world = rank_and_world()
    if world == 1:
        store = BlockStore(folder, spec)
        return store, store.done()
    import torch.distributed as dist

    store = BlockStore(folder, spec, writer=rank == 0)
    done = [sorted(store.done()) if rank == 0 else None]
    dist.broadcast_object_list(done, src=0)  # after process 0 removed any blocks of another search
    return store, set(done[0] or ())


def gather_list(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` of every process, in rank order (on the device of ``x``)."""
    import torch.distributed as dist

    parts = [torch.empty_like(x, device=collective_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.to(collective_device()).contiguous())
    return [p.to(x.device) for p in parts]


def _block_saved(b: int) -> None:
    """Called after each block is on disk (a hook for the kill-and-resume test)."""


class FastSearch:
    """The certified tiled search on a search problem (search._Problem): candidates, re-rank, certification."""

    def __init__(self, prob: Any, device: torch.device, tiles: str = "auto") -> None:
        self.prob, self.device = prob, device
        self.groups_db = prob.groups[prob.db_rows_t].to(device)
        dtype = tiled.tile_dtype(tiles, device)
        self.engine = self._engine(dtype)
        self._fp32_engine: TiledCandidates | None = None  # bf16 searches: the second pass of uncertified rows
        self.local = torch.full((prob.n,), -1, dtype=torch.int64)
        self.local[prob.db_rows_t] = torch.arange(prob.n_db)
        self.uncertified = 0  # rows whose candidates could not be certified (searched again)
        self.researched = 0  # rows searched again exactly inside the blocks
        self.float64_rows = 0  # of those, rows that needed the float64 scan
        self.resumed = 0  # blocks read back from a previous run

    def _engine(self, dtype: torch.dtype) -> TiledCandidates:
        prob, device = self.prob, self.device
        return TiledCandidates(lambda a, b: prob.db_slice(a, b).to(device), prob.n_db, prob.src.shape[1],
                               self.groups_db, prob.k + tiled.margin(dtype), device, dtype=dtype)

    def research(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of rows the tiles could not certify.

        After bf16 tiles, first fp32 tiles against the whole database for these rows only:
        their error bound is ~2^16 times smaller, so nearly every row certifies there, and a
        fp32 pass costs a fraction of the float64 scan (`exact_rows`) the rest still get.
        """
        self.researched += len(rows)
        if self.engine.dtype == torch.float32:
            self.float64_rows += len(rows)
            return self.prob.exact_rows(rows)
        if self._fp32_engine is None:
            self._fp32_engine = self._engine(torch.float32)
        idx, sc, short = self._candidates(self._fp32_engine, rows)
        if short.any():
            self.float64_rows += int(short.sum())
            idx[short], sc[short] = self.prob.exact_rows(rows[short])
        return idx, sc

    def _candidates(self, engine: TiledCandidates, rows: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        v, j = engine.queries(self.prob.rows(rows).to(dev), self.prob.groups[rows].to(dev), self.local[rows].to(dev))
        return self.finish(rows, v, j, engine)

    def finish(self, rows: torch.Tensor, cand_v: torch.Tensor, cand_j: torch.Tensor,
               engine: TiledCandidates | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k of sample rows from their candidates: (indices, scores, rows not certified).

        A tile score is within ``err`` of the exact score. When the first k+1 candidates are
        more than 2 err apart, the tile order is the exact order. Other rows (near-ties, and
        every row of a bf16 search) are re-scored in float64 and ordered by (score, lower
        index); they are certified when the k-th exact score beats the c-th tile score + err.
        """
        prob, k, engine = self.prob, self.prob.k, engine or self.engine
        cand_v, cand_j = cand_v.cpu(), cand_j.cpu()
        q = prob.rows(rows)
        exists = torch.isfinite(cand_v)
        samples = torch.where(exists, prob.db_rows_t[cand_j.clamp(min=0)], prob.n)
        last = cand_v[:, -1]
        err = engine.error_bound(q, last)
        nxt = cand_v[:, k] if cand_v.shape[1] > k else torch.full_like(last, float("-inf"))
        gaps = torch.cat([cand_v[:, :k], nxt[:, None]], 1).diff(dim=1).neg()  # >= 0, best first
        clear = (gaps > 2 * err[:, None]).all(dim=1) & exists[:, :k].all(dim=1)
        if engine.dtype != torch.float32:
            clear[:] = False  # bf16 tile scores order the rows but are not scores to keep: all re-scored
        top_i, top_s = samples[:, :k].clone(), cand_v[:, :k].clone()
        short = torch.zeros(len(rows), dtype=torch.bool)
        redo = (~clear).nonzero().flatten()
        if len(redo):
            r = redo
            exact = exact_scores(q[r], prob.rows(prob.db_rows_t[cand_j[r].clamp(min=0)]))
            exact.masked_fill_(~exists[r], float("-inf"))
            ex_s, ex_i = tiled._ordered(exact, samples[r], k)
            # Every non-candidate's tile score is <= last, so its exact score is <= last + err.
            certified = torch.isinf(last[r]) | (ex_s[:, -1] > last[r].double() + err[r].double())
            top_i[r], top_s[r] = ex_i, ex_s.float()
            short[r] = ~certified | torch.isinf(ex_s[:, -1])  # -inf: fewer than k eligible; the fallback says so
            if engine is self.engine:
                self.uncertified += int((~certified).sum())
        return top_i, top_s, short

    def spec(self, key: str) -> dict[str, Any]:
        """What finished blocks on disk must match to be reused."""
        prob, eng = self.prob, self.engine
        sample = np.asarray(prob.src[:: max(1, prob.n // 64)], dtype=np.float32)
        digest = hashlib.sha256(sample.tobytes() + prob.groups[:: max(1, prob.n // 64)].numpy().tobytes()
                                + prob.db_rows.tobytes()).hexdigest()
        return {"format": BLOCK_FORMAT, "key": key, "n": prob.n, "n_db": prob.n_db, "d": eng.d, "k": prob.k,
                "c": eng.c, "tile": eng.tile, "dtype": str(eng.dtype), "digest": digest}

    def all_rows(self, resume: tuple[BlockStore, set[int]] | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(sample rows, indices, scores, short) for every row: database rows by the self-join, then the rest.

        A database block is final when yielded (its uncertified rows are searched again
        first), so it can be kept in the store (``resume``: the store and its finished
        blocks, from `open_store`); blocks found there are read back, not searched again.
        Under torchrun, process 0 writes the blocks.
        """
        prob = self.prob
        rank, world = rank_and_world()
        store, done = resume if resume is not None else (None, set())
        for b in sorted(done):
            lo, hi = self.engine.span(b)
            idx, sc = store.load(b)  # type: ignore[union-attr]
            self.resumed += 1
            yield prob.db_rows_t[lo:hi], idx, sc, torch.zeros(hi - lo, dtype=torch.bool)
        blocks = self.engine.self_join(done) if world == 1 else self._distributed(rank, world, done)
        for b, v, j in blocks:
            lo, hi = self.engine.span(b)
            rows = prob.db_rows_t[lo:hi]
            idx, sc, short = self.finish(rows, v, j)
            if short.any():
                idx[short], sc[short] = self.research(rows[short])
            if store is not None and rank == 0:
                store.save(b, idx, sc)
            yield rows, idx, sc, torch.zeros(len(rows), dtype=torch.bool)
        yield from self._others()

    def _others(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        others = torch.from_numpy(np.flatnonzero(self.local.numpy() < 0))  # invalid rows: not in the database
        for start in range(0, len(others), 4096):
            rows = others[start:start + 4096]
            yield rows, *self.rows(rows)

    def _distributed(self, rank: int, world: int, done: set[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(block, candidate values, database indices) of the blocks not in ``done``, as `self_join` gives them.

        The blocks go in rounds of K (processes): in a round, process r multiplies tile row
        first + r; then the rows of the round's K blocks have all their candidates, the K
        partial lists are gathered and merged, and every process finishes the same merged
        candidates (so every process returns the same table, and a kill loses at most a round).
        """
        eng = self.engine
        state = eng.new_state()
        for first in range(0, eng.n_blocks, world):
            blocks = range(first, min(first + world, eng.n_blocks))
            if first + rank < eng.n_blocks:
                eng.tile_row(state, first + rank, done)
            todo = [b for b in blocks if b not in done]  # the same in every process
            if not todo:
                continue
            lo, hi = eng.span(blocks[0])[0], eng.span(blocks[-1])[1]
            v, j = eng.sorted_candidates(state, lo, hi)
            v, j = eng.merge_partials(gather_list(v), gather_list(j))
            for b in todo:
                b_lo, b_hi = eng.span(b)
                yield b, v[b_lo - lo:b_hi - lo], j[b_lo - lo:b_hi - lo]

    def rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Any sample rows against the database (no symmetry); uncertified rows searched again here."""
        idx, sc, short = self._candidates(self.engine, rows)
        if short.any():
            idx[short], sc[short] = self.research(rows[short])
        return idx, sc, torch.zeros(len(rows), dtype=torch.bool)
