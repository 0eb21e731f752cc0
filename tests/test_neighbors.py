"""Neighbour search, tables on disk, pick() and the FIFO queue (tiny random data, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_ping import knn as nb
from clip_ping.errors import ConfigError, DataError
from clip_ping.knn import (
    NeighborQueue,
    NeighborsConfig,
    build_neighbors,
    load_neighbors,
    search_neighbors,
)
from clip_ping.knn import search as nb_search
from clip_ping.knn import tiled as nb_tiled


def clustered(n: int, d: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    """L2-normalised Gaussian mixture (float32): realistic, many close neighbours."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    label = rng.integers(0, n_clusters, n)
    x = centers[label] + rng.uniform(0.5, 1.5, (n_clusters, 1))[label] * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(x: np.ndarray, k: int, groups: np.ndarray | None = None, valid: np.ndarray | None = None):
    """Reference: full float64 score matrix with exclusions masked."""
    n = len(x)
    x64 = x.astype(np.float64)
    s = x64 @ x64.T
    g = np.arange(n)[:, None] if groups is None else np.asarray(groups).reshape(n, -1)
    excluded = (g[:, None, :] == g[None, :, :]).any(axis=2) | np.eye(n, dtype=bool)
    if valid is not None:
        excluded |= ~valid[None, :]
    s[excluded] = -np.inf
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, axis=1)


def with_duplicates(n: int, d: int, seed: int = 1):
    """Data with exact duplicate rows sharing a group id, a second group column and invalid rows."""
    rng = np.random.default_rng(seed)
    x = clustered(n, d, 8, seed)
    groups = np.arange(n)
    for start in range(0, 60, 6):  # ten groups of three identical rows: the best "neighbours" of each other
        x[start + 1: start + 3] = x[start]
        groups[start: start + 3] = start
    other = np.arange(n)
    other[100:110] = 100  # a second kind of duplicate (e.g. same caption) with different features
    valid = rng.random(n) > 0.1
    return x, np.stack([groups, other], axis=1), valid


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_exact_methods_equal_brute_force(method):
    x = clustered(400, 16, 10)
    idx, scores = search_neighbors(x, 5, method=method, block_size=128)
    ref_i, ref_s = brute_force(x, 5)
    assert idx.dtype == np.int64 and scores.dtype == np.float32 and idx.shape == (400, 5)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-tiles", "fp32-tiles"])
def test_fast_search_is_exact_with_either_tile_precision(bf16, monkeypatch):
    """Both tile precisions run on any machine (bf16 is picked only where it is fast): the ids and the
    float64 scores of a brute force, also where bf16 tile scores would order rows right but round scores."""
    from clip_ping.knn import tiled

    monkeypatch.setattr(tiled, "bf16_matmul_is_fast", lambda device="cpu": bf16)
    x, groups, valid = with_duplicates(500, 16)
    _, scores = search_neighbors(x, 4, groups=groups, valid=valid, method="fast", block_size=100)
    _, ref_s = brute_force(x, 4, groups, valid)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)  # duplicated rows tie: scores, not the order of equals
    clean = clustered(400, 16, 10)
    idx, scores = search_neighbors(clean, 5, method="fast", block_size=128)
    ref_i, ref_s = brute_force(clean, 5)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


@pytest.mark.parametrize("method", ["exact", "fast", "ivf", "ivfpq", "hnsw"])
def test_self_duplicates_and_invalid_rows_never_returned(method):
    x, groups, valid = with_duplicates(500, 16)
    idx, scores = search_neighbors(x, 4, groups=groups, valid=valid, method=method, block_size=100)
    rows = np.arange(500)[:, None]
    assert (idx >= 0).all()
    assert not (idx == rows).any()
    assert valid[idx].all()
    for col in range(groups.shape[1]):
        assert not (groups[idx, col] == groups[rows, col]).any()
    if method in ("exact", "fast"):  # duplicated rows tie: compare scores, not the order of equals
        _, ref_s = brute_force(x, 4, groups, valid)
        np.testing.assert_allclose(scores, ref_s, atol=1e-5)


def test_query_rows_searches_a_subset():
    x = clustered(300, 8, 5, seed=7)
    full_i, full_s = search_neighbors(x, 3, method="exact")
    rows = np.array([5, 0, 299])
    for method in ("exact", "fast"):
        idx, scores = search_neighbors(x, 3, method=method, query_rows=rows)
        np.testing.assert_array_equal(idx, full_i[rows])
        np.testing.assert_allclose(scores, full_s[rows], atol=1e-5)


def test_fast_matches_exact_on_clustered_data():
    x = clustered(5000, 64, 50, seed=3)
    ex_i, ex_s = search_neighbors(x, 11, method="exact")  # one more, to see near-ties at the k-th place
    stats: dict = {}
    fa_i, fa_s = search_neighbors(x, 10, method="fast", stats=stats)
    assert stats["method"] == "fast"
    assert (ex_i[:, 0] == fa_i[:, 0]).mean() >= 0.999
    # FAISS and torch sum in different orders (fp32 differences ~1e-7): sets must match
    # wherever the 10th and 11th exact scores are not a near-tie.
    clear = ex_s[:, 9] - ex_s[:, 10] > 1e-5
    assert clear.mean() > 0.99
    assert all(set(a) == set(b) for a, b in zip(ex_i[clear, :10], fa_i[clear]))
    np.testing.assert_allclose(fa_s, ex_s[:, :10], atol=1e-5)


@pytest.mark.parametrize("tiles", ["fp32", "bf16"])
def test_fast_certification_falls_back_to_exact(monkeypatch, tiles):
    """No margin and tiny score tiles: many rows are uncertified or chunked, the result stays exact.
    After bf16 tiles the uncertified rows take a fp32 pass first; only what that cannot certify is scanned in float64."""
    monkeypatch.setattr(nb_tiled, "FAST_MARGIN", 0)
    monkeypatch.setattr(nb_tiled, "FAST_MARGIN_BF16", 0)
    monkeypatch.setattr(nb_tiled, "FAST_TILE_BYTES", 64 * 1024)
    x = clustered(1500, 32, 3, seed=4)  # few, wide clusters: crowded top scores
    stats: dict = {}
    idx, scores = search_neighbors(x, 5, method="fast", block_size=256, stats=stats, tiles=tiles)
    assert stats["fast_uncertified_rows"] > 0 and stats["rows_researched"] >= stats["fast_uncertified_rows"]
    if tiles == "bf16":
        assert stats["fast_float64_rows"] < stats["fast_uncertified_rows"]
    ref_i, ref_s = brute_force(x, 5)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


@pytest.mark.parametrize("heaps", [True, False], ids=["faiss-heaps", "torch-thresholds"])
@pytest.mark.parametrize("exclude", ["self", "groups"])
def test_fast_equals_brute_force_with_ties_and_duplicate_groups_over_many_tiles(monkeypatch, exclude, heaps):
    """Tiles of 48 rows: the upper-triangle tiles run, merged by FAISS's heaps (CPU) or by the torch
    threshold path (what CUDA runs; head of 16 columns, column groups); identical rows make
    exact ties, broken by the lower index."""
    monkeypatch.setattr(nb_tiled, "FAST_TILE_BYTES", 48 * 48 * 4)
    monkeypatch.setattr(nb_tiled, "HEAD", 16)
    monkeypatch.setattr(nb_tiled, "USE_FAISS_HEAPS", heaps)
    x, groups, valid = with_duplicates(700, 12, seed=7)
    x[200:230] = x[199]  # 31 identical rows: ties far beyond k and the margin
    x[400:403] = x[300]
    if exclude == "self":
        groups = None
    stats: dict = {}
    idx, scores = search_neighbors(x, 5, groups=groups, valid=valid, method="fast", stats=stats)
    ref_i, ref_s = brute_force(x, 5, groups, valid)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-6)
    if exclude == "groups":  # duplicate groups are masked inside the tiles: nothing is re-searched for them
        assert stats["rows_researched"] == stats["fast_uncertified_rows"]


def test_fast_multiplies_only_the_upper_triangle_of_tiles(monkeypatch):
    calls = []
    product = nb_tiled._product
    monkeypatch.setattr(nb_tiled, "_product", lambda a, b: calls.append((len(a), len(b))) or product(a, b))
    monkeypatch.setattr(nb_tiled, "FAST_TILE_BYTES", 100 * 100 * 4)
    x = clustered(1000, 16, 10, seed=8)  # 10 blocks of 100 rows
    idx, _ = search_neighbors(x, 3, method="fast")
    assert len(calls) == 10 * 11 // 2 and sum(a * b for a, b in calls) == (1000 * 1000 + 10 * 100 * 100) // 2
    np.testing.assert_array_equal(idx, brute_force(x, 3)[0])


_KILL_SCRIPT = """
import os, sys
import numpy as np
from clip_ping.knn import fast, search_neighbors, tiled
tiled.FAST_TILE_BYTES = 64 * 64 * 4
saved = []
def hook(b):
    saved.append(b)
    if len(saved) == 3:
        os.kill(os.getpid(), 9)  # kill -9 in the middle of the search
fast._block_saved = hook
x = np.load(sys.argv[1], mmap_mode="r")
search_neighbors(x, 4, method="fast", resume_dir=sys.argv[2])
"""


def test_fast_search_killed_and_resumed_is_byte_identical(tmp_path, monkeypatch):
    import subprocess
    import sys

    x = clustered(640, 16, 6, seed=9).astype(np.float16)  # 10 blocks of 64 rows
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "x.npy"), str(tmp_path / "resume")],
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(nb.__file__).parents[2])})
    assert proc.returncode == -9
    assert len(list((tmp_path / "resume").glob("block-*.npz"))) == 3
    monkeypatch.setattr(nb_tiled, "FAST_TILE_BYTES", 64 * 64 * 4)
    stats: dict = {}
    resumed = search_neighbors(np.load(tmp_path / "x.npy", mmap_mode="r"), 4, method="fast",
                               resume_dir=tmp_path / "resume", stats=stats)
    assert stats["blocks_resumed"] == 3
    fresh = search_neighbors(x, 4, method="fast")
    assert resumed[0].tobytes() == fresh[0].tobytes() and resumed[1].tobytes() == fresh[1].tobytes()
    np.testing.assert_array_equal(fresh[0], brute_force(x.astype(np.float32), 4)[0])
    # other data in the same folder: the old blocks are not reused
    stats = {}
    other = search_neighbors(x[::-1].copy(), 4, method="fast", resume_dir=tmp_path / "resume", stats=stats)
    assert stats["blocks_resumed"] == 0
    np.testing.assert_array_equal(other[0], brute_force(x[::-1].astype(np.float32), 4)[0])


_TWO_PROCESS_SCRIPT = """
import sys
import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, folder):
    from clip_ping.knn import search_neighbors, tiled
    tiled.FAST_TILE_BYTES = 64 * 64 * 4
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    z = np.load(f"{folder}/data.npz")
    idx, scores = search_neighbors(z["x"], 4, groups=z["groups"], valid=z["valid"], method="fast")
    np.savez(f"{folder}/rank{rank}.npz", idx=idx, scores=scores)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
"""


def test_two_process_gloo_search_equals_one_process_byte_for_byte(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    x, groups, valid = with_duplicates(600, 12, seed=11)  # 10 blocks of 64 rows: both processes own rows of tiles
    np.savez(tmp_path / "data.npz", x=x, groups=groups, valid=valid)
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(Path(nb.__file__).parents[2])})
    monkeypatch.setattr(nb_tiled, "FAST_TILE_BYTES", 64 * 64 * 4)
    one_i, one_s = search_neighbors(x, 4, groups=groups, valid=valid, method="fast")
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as z:
            assert z["idx"].tobytes() == one_i.tobytes() and z["scores"].tobytes() == one_s.tobytes()
    np.testing.assert_array_equal(one_i, brute_force(x, 4, groups, valid)[0])


_TWO_PROCESS_INDEX_SCRIPT = """
import sys
import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, folder, method):
    from clip_ping.knn import search as nb_search
    searched = []
    for name in ("_search_exact", "_search_ivfpq"):
        inner = getattr(nb_search, name)
        setattr(nb_search, name, lambda prob, rows, state, inner=inner: searched.append(len(rows)) or inner(prob, rows, state))
    dist.init_process_group("gloo", init_method=f"file://{folder}/store-{method}", rank=rank, world_size=2)
    z = np.load(f"{folder}/data.npz")
    idx, scores = nb_search.search_neighbors(z["x"], 4, groups=z["groups"], valid=z["valid"], method=method,
                                             block_size=100)
    np.savez(f"{folder}/{method}-rank{rank}.npz", idx=idx, scores=scores, searched=sum(searched))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


@pytest.mark.parametrize("method", ["exact", "ivfpq"])
def test_two_process_index_search_splits_the_queries_and_equals_one_process(tmp_path, method):
    """FAISS methods under torchrun: each process searches every other block of rows, all end with one table,
    the one a single process finds."""
    import os
    import subprocess
    import sys

    x, groups, valid = with_duplicates(600, 12, seed=11)  # 6 blocks of 100 rows
    np.savez(tmp_path / "data.npz", x=x, groups=groups, valid=valid)
    script = tmp_path / "two_index.py"
    script.write_text(_TWO_PROCESS_INDEX_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path), method], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(Path(nb.__file__).parents[2])})
    one_i, one_s = search_neighbors(x, 4, groups=groups, valid=valid, method=method, block_size=100)
    for rank in (0, 1):
        with np.load(tmp_path / f"{method}-rank{rank}.npz") as z:
            assert z["idx"].tobytes() == one_i.tobytes() and z["scores"].tobytes() == one_s.tobytes()
            assert int(z["searched"]) == 300  # half the rows each, not all of them twice


_TWO_PROCESS_KILL_SCRIPT = """
import json, os, sys, time
import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, folder, kill):
    from clip_ping.knn import fast, search_neighbors, tiled
    tiled.FAST_TILE_BYTES = 64 * 64 * 4
    tiles = []
    tile = tiled.TiledCandidates._tile
    tiled.TiledCandidates._tile = lambda self, bi, bj, xi: tiles.append((bi, bj)) or tile(self, bi, bj, xi)
    gather, calls = fast.gather_list, []

    def gather_or_die(x):
        calls.append(1)
        if kill and rank == 1 and len(calls) == 5:  # the third round's merge: rounds 1-2 are final
            while len([f for f in os.listdir(f"{folder}/resume") if f.startswith("block-")]) < 4:
                time.sleep(0.01)  # until process 0 has written them
            os.kill(os.getpid(), 9)
        return gather(x)

    fast.gather_list = gather_or_die
    dist.init_process_group("gloo", init_method=f"file://{folder}/store-{kill}", rank=rank, world_size=2)
    z = np.load(f"{folder}/data.npz")
    stats = {}
    idx, scores = search_neighbors(z["x"], 4, groups=z["groups"], valid=z["valid"], method="fast",
                                   resume_dir=f"{folder}/resume", stats=stats)
    np.savez(f"{folder}/rank{rank}.npz", idx=idx, scores=scores)
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump({"resumed": stats["blocks_resumed"], "tiles": tiles}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:  # one start of this script for both runs: the killed one, then the resume
        mp.spawn(run, args=(sys.argv[1], True), nprocs=2)
    except mp.ProcessExitedException as exc:
        print(f"first run: process {exc.error_index} ended by signal {exc.signal_name}", flush=True)
    else:
        sys.exit("the first run was not killed")
    mp.spawn(run, args=(sys.argv[1], False), nprocs=2)
"""


def test_two_process_search_killed_and_resumed_equals_one_process_byte_for_byte(tmp_path, monkeypatch):
    """kill -9 of one process of a 2-process gloo search, then a resume: no finished block is lost or
    multiplied again, and the table is the 1-process table byte for byte."""
    import json
    import os
    import subprocess
    import sys

    x, groups, valid = with_duplicates(600, 12, seed=12)
    n_blocks = -(-int(valid.sum()) // 64)  # blocks of 64 valid (database) rows, in rounds of 2
    assert n_blocks >= 7  # the kill comes in the third round, and rounds are left after it
    np.savez(tmp_path / "data.npz", x=x, groups=groups, valid=valid)
    script = tmp_path / "two_kill.py"
    script.write_text(_TWO_PROCESS_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(nb.__file__).parents[2])}
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], timeout=300, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert "first run: process 1 ended by signal SIGKILL" in out
    monkeypatch.setattr(nb_tiled, "FAST_TILE_BYTES", 64 * 64 * 4)
    one_i, one_s = search_neighbors(x, 4, groups=groups, valid=valid, method="fast")
    tiles = []
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as z:
            assert z["idx"].tobytes() == one_i.tobytes() and z["scores"].tobytes() == one_s.tobytes()
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert info["resumed"] == 4  # blocks 0-3, written before the kill
        tiles += [tuple(t) for t in info["tiles"]]
    # each tile once over both processes, and none between two finished blocks
    expected = [(i, j) for i in range(n_blocks) for j in range(i, n_blocks) if not (i < 4 and j < 4)]
    assert sorted(tiles) == expected
    np.testing.assert_array_equal(one_i, brute_force(x, 4, groups, valid)[0])
    # blocks of a torchrun search resume in one process too (the spec does not depend on the process count)
    for late in (tmp_path / "resume").glob("block-*.npz"):
        if int(late.stem[6:]) >= 4:
            late.unlink()
    stats: dict = {}
    again = search_neighbors(x, 4, groups=groups, valid=valid, method="fast", resume_dir=tmp_path / "resume",
                             stats=stats)
    assert stats["blocks_resumed"] == 4
    assert again[0].tobytes() == one_i.tobytes() and again[1].tobytes() == one_s.tobytes()


def test_fast_search_streams_the_bank_instead_of_copying_it(monkeypatch):
    """The fast path reads tiles from the memmap: it never builds the whole float32 matrix."""

    monkeypatch.setattr(nb_tiled, "FAST_TILE_BYTES", 100 * 100 * 4)
    monkeypatch.setattr(nb_search._Problem, "x", property(lambda self: pytest.fail("whole bank copied")))
    x = clustered(500, 8, 5, seed=10)
    valid = np.ones(500, dtype=bool)
    valid[[3, 77]] = False
    x[3] = np.nan  # an invalid row that did not decode: still gets neighbours, is never one
    idx, _ = search_neighbors(x.astype(np.float16), 3, valid=valid, method="fast")
    ref = brute_force(np.nan_to_num(x.astype(np.float16).astype(np.float32)), 3, valid=valid)[0]
    np.testing.assert_array_equal(idx, ref)


def test_ivf_recall_is_high_when_probing_every_list():
    x = clustered(3000, 32, 30, seed=5)
    ex_i, _ = search_neighbors(x, 5, method="exact")
    stats: dict = {}
    iv_i, _ = search_neighbors(x, 5, method="ivf", nprobe=10_000, stats=stats)
    assert stats["nprobe"] == stats["nlist"] > 1
    assert (iv_i[:, 0] == ex_i[:, 0]).mean() >= 0.999
    hn_i, _ = search_neighbors(x, 5, method="hnsw")
    assert (hn_i[:, 0] == ex_i[:, 0]).mean() >= 0.95


def test_ivfpq_streams_the_bank_and_rescores_exactly(monkeypatch):
    """IVF-PQ adds the float16 bank chunk by chunk (never a float32 copy of it), probes nlist/4 lists,
    and returns float64 scores in the exact methods' order; with a re-scoring depth of 1 it finds less."""
    monkeypatch.setattr(nb_search, "_CHUNK", 700)  # several chunks added
    monkeypatch.setattr(nb_search._Problem, "x", property(lambda self: pytest.fail("whole bank copied")))
    x = clustered(3000, 32, 30, seed=5).astype(np.float16)
    ref_i, ref_s = brute_force(x.astype(np.float32), 5)
    stats: dict = {}
    idx, scores = search_neighbors(x, 5, method="ivfpq", stats=stats)
    assert stats["method"] == "ivfpq" and stats["k_factor"] == nb_search.DEFAULT_K_FACTOR
    assert stats["nprobe"] == nb.default_nprobe_pq(stats["nlist"]) and stats["nlist"] > 1
    found = idx[:, 0] == ref_i[:, 0]
    assert found.mean() >= 0.97
    # where the right neighbours were found, their scores are the float64 ones, best first
    exact = np.take_along_axis(x.astype(np.float64) @ x.astype(np.float64).T, idx, axis=1)
    np.testing.assert_allclose(scores, exact, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_allclose(scores[found, 0], ref_s[found, 0], atol=1e-6)
    shallow, _ = search_neighbors(x, 5, method="ivfpq", k_factor=1, nprobe=4)
    assert (shallow[:, 0] == ref_i[:, 0]).mean() < found.mean()


def test_ivfpq_refuses_tiny_banks_and_bad_k_factor():
    with pytest.raises(ConfigError, match="at least 256"):
        search_neighbors(clustered(200, 8, 4), 3, method="ivfpq")
    with pytest.raises(ConfigError, match="k_factor"):
        search_neighbors(clustered(400, 8, 4), 3, method="ivfpq", k_factor=0)
    with pytest.raises(ConfigError, match="k_factor"):
        NeighborsConfig(banks="b", k_factor=0).validate()


@pytest.mark.parametrize("tiles", ["fp32", "bf16"])
def test_tile_precision_is_a_choice_and_recorded(tiles):
    x = clustered(600, 16, 6, seed=11)
    stats: dict = {}
    idx, scores = search_neighbors(x, 4, method="fast", tiles=tiles, stats=stats)
    assert stats["tiles"] == tiles
    ref_i, ref_s = brute_force(x, 4)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-6)
    with pytest.raises(ConfigError, match="tiles"):
        search_neighbors(x, 4, method="fast", tiles="fp8")


def test_large_duplicate_group_is_researched_not_returned():
    x = clustered(300, 8, 4, seed=6)
    groups = np.arange(300)
    groups[:40] = 0  # larger than the over-fetch
    x[:40] = x[0]
    stats: dict = {}
    idx, scores = search_neighbors(x, 3, groups=groups, method="exact", stats=stats)
    assert stats["rows_researched"] > 0
    assert not np.isin(idx[:40], np.arange(40)).any()
    np.testing.assert_allclose(scores, brute_force(x, 3, groups)[1], atol=1e-5)


def test_too_few_eligible_rows_is_a_data_error():
    x = clustered(10, 4, 2)
    with pytest.raises(DataError, match="lower k"):
        search_neighbors(x, 10, method="exact")
    groups = np.zeros(10, dtype=np.int64)
    groups[9] = 1  # row 9 has one eligible neighbour, the others one too
    with pytest.raises(DataError, match="eligible"):
        search_neighbors(x, 2, groups=groups, method="exact")


def test_auto_method_and_bad_method():
    assert nb.resolve_method("auto", nb.AUTO_EXACT_MAX_ROWS + 1) == "ivfpq"
    # a GPU is never left idle for a CPU index: the tiled exact search runs on it at any size
    assert nb.resolve_method("auto", nb.AUTO_EXACT_MAX_ROWS + 1, device="cuda") == "fast"
    assert nb.default_nprobe(4000) == 250 and nb.default_nprobe(100) == 32 and nb.default_nprobe(10) == 10
    assert nb.resolve_method("auto", 1000) == "fast"
    assert nb.default_nprobe_pq(4000) == 1000 and nb.default_nprobe_pq(40) == 32 and nb.default_nprobe_pq(10) == 10
    with pytest.raises(ConfigError):
        nb.resolve_method("brute", 10)


# --------------------------------------------------------------------------- tables on disk


def make_bank(folder: Path, n: int = 300, seed: int = 0, fingerprint: str = "fp-1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = clustered(n, 24, 6, seed)
    text = clustered(n, 16, 6, seed + 1)
    image_group = np.arange(n, dtype=np.int64)
    image_group[1] = 0
    image[1] = image[0]
    text_group = np.arange(n, dtype=np.int64)
    text_group[3] = 2
    text[3] = text[2]
    valid = np.ones(n, dtype=bool)
    valid[5] = False
    np.save(folder / "image.npy", image.astype(np.float16))
    np.save(folder / "text.npy", text.astype(np.float16))
    np.save(folder / "valid.npy", valid)
    np.save(folder / "image_group.npy", image_group)
    np.save(folder / "text_group.npy", text_group)
    (folder / "manifest.json").write_text(json.dumps({"count": n, "fingerprint": fingerprint}))
    return folder


def test_build_neighbors_writes_tables_that_load_and_match(tmp_path):
    bank = make_bank(tmp_path / "bank")
    out = build_neighbors(NeighborsConfig(banks=str(bank), k=4, method="exact", progress=False))
    assert out == bank / "neighbors.json"
    info = json.loads(out.read_text())
    assert info["k"] == 4 and info["method"] == "exact" and info["bank_fingerprint"] == "fp-1"
    assert set(info["timings"]) == {"image_s", "text_s"}

    table = load_neighbors(bank)
    assert table.k == 4 and len(table) == 300
    assert isinstance(table.image, np.memmap)
    image = np.load(bank / "image.npy").astype(np.float32)
    groups = np.stack([np.load(bank / "image_group.npy"), np.load(bank / "text_group.npy")], axis=1)
    valid = np.load(bank / "valid.npy")
    np.testing.assert_allclose(table.image_scores, brute_force(image, 4, groups, valid)[1], atol=1e-5)
    assert not (table.image == 5).any() and not (table.text == 5).any()  # invalid row
    assert not (table.image[0] == 1).any() and not (table.text[2] == 3).any()  # duplicates
    assert not (table.image[2] == 3).any()  # exclude="both": same caption counts on the image side too
    assert table.image_scores.dtype == np.float32 and (np.diff(table.image_scores, axis=1) <= 1e-6).all()

    # up to date: kept as is; other settings need --overwrite
    mtime = (bank / "neighbors_image.npy").stat().st_mtime_ns
    build_neighbors(NeighborsConfig(banks=str(bank), k=4, method="exact", progress=False))
    assert (bank / "neighbors_image.npy").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="overwrite"):
        build_neighbors(NeighborsConfig(banks=str(bank), k=3, method="exact", progress=False))
    build_neighbors(NeighborsConfig(banks=str(bank), k=3, method="fast", overwrite=True, progress=False))
    assert load_neighbors(bank).k == 3


def test_build_with_fast_equals_exact_and_leaves_no_resume_blocks(tmp_path):
    bank = make_bank(tmp_path / "bank")
    build_neighbors(NeighborsConfig(banks=str(bank), k=4, method="fast", progress=False))
    assert not (bank / ".neighbors").exists()
    fast = load_neighbors(bank)
    image = np.load(bank / "image.npy").astype(np.float32)
    groups = np.stack([np.load(bank / "image_group.npy"), np.load(bank / "text_group.npy")], axis=1)
    np.testing.assert_array_equal(fast.image, brute_force(image, 4, groups, np.load(bank / "valid.npy"))[0])


def test_exclude_same_side_and_self(tmp_path):
    bank = make_bank(tmp_path / "bank")
    build_neighbors(NeighborsConfig(banks=str(bank), k=3, method="exact", exclude="self", progress=False))
    table = load_neighbors(bank)
    assert table.image[0, 0] == 1  # identical image, now allowed
    build_neighbors(NeighborsConfig(banks=str(bank), k=3, method="exact", exclude="same_side", overwrite=True,
                                    progress=False))
    table = load_neighbors(bank)
    assert not (table.image[0] == 1).any() and not (table.text[2] == 3).any()


def test_fingerprint_mismatch_and_missing_table_are_data_errors(tmp_path):
    bank = make_bank(tmp_path / "bank")
    with pytest.raises(DataError, match="run clip-ping neighbors"):
        load_neighbors(bank)
    build_neighbors(NeighborsConfig(banks=str(bank), k=2, method="exact", progress=False))
    with pytest.raises(DataError, match="another bank"):
        load_neighbors(bank, expected_fingerprint="something-else")
    (bank / "manifest.json").write_text(json.dumps({"count": 300, "fingerprint": "fp-2"}))  # bank rebuilt
    with pytest.raises(DataError, match="another bank"):
        load_neighbors(bank)
    with pytest.raises(DataError, match="no manifest"):
        build_neighbors(NeighborsConfig(banks=str(tmp_path), k=2, progress=False))
    with pytest.raises(ConfigError, match="--banks"):
        build_neighbors(NeighborsConfig(k=2))


def test_table_format_is_checked_on_read_and_an_old_format_is_rebuilt(tmp_path):
    bank = make_bank(tmp_path / "bank")
    cfg = NeighborsConfig(banks=str(bank), k=2, method="exact", progress=False)
    json_path = build_neighbors(cfg)
    info = json.loads(json_path.read_text())
    assert info["format"] == nb.FORMAT_VERSION
    info["format"] = nb.FORMAT_VERSION + 1
    json_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match="table format"):
        load_neighbors(bank)
    build_neighbors(cfg)  # not "other settings": a table of another format is rebuilt
    assert json.loads(json_path.read_text())["format"] == nb.FORMAT_VERSION
    assert load_neighbors(bank).k == 2


def test_pick_top1_and_topk(tmp_path):
    bank = make_bank(tmp_path / "bank")
    build_neighbors(NeighborsConfig(banks=str(bank), k=4, method="exact", progress=False))
    table = load_neighbors(bank)
    index = torch.tensor([0, 7, 7, 42, 299])
    p, q = table.pick(index, 1)
    assert p.dtype == torch.int64 and p.tolist() == table.image[index.numpy(), 0].tolist()
    assert q.tolist() == table.text[index.numpy(), 0].tolist()

    many = torch.full((2000,), 7)
    p, q = table.pick(many, 3, torch.Generator().manual_seed(0))
    assert set(p.tolist()) == set(table.image[7, :3].tolist())
    assert set(q.tolist()) == set(table.text[7, :3].tolist())
    counts = np.unique(p.numpy(), return_counts=True)[1]
    assert counts.min() > 500  # uniform over the three
    p2, q2 = table.pick(many, 3, torch.Generator().manual_seed(0))
    assert torch.equal(p, p2) and torch.equal(q, q2)
    with pytest.raises(ConfigError):
        table.pick(index, 5)


# --------------------------------------------------------------------------- queue


def test_queue_returns_nearest_queued_sample():
    torch.manual_seed(0)
    queue = NeighborQueue(size=8, image_dim=6, text_dim=5, include_batch=False)
    a, b = torch.randn(12, 6), torch.randn(12, 5)
    queue.push(torch.arange(12), a, b)  # only the last 8 (indices 4..11) stay
    assert len(queue) == 8 and sorted(queue.indices.tolist()) == list(range(4, 12))

    index = torch.tensor([4, 100])
    qa, qb = torch.stack([a[4], torch.randn(6)]), torch.stack([b[4], torch.randn(5)])
    p, q = queue.query(index, qa, qb)
    an = torch.nn.functional.normalize(a, dim=1)
    bn = torch.nn.functional.normalize(b, dim=1)
    for row, (key_a, key_b) in enumerate(zip(qa, qb)):
        sa = an[4:12] @ torch.nn.functional.normalize(key_a, dim=0)
        sb = bn[4:12] @ torch.nn.functional.normalize(key_b, dim=0)
        if index[row] == 4:  # itself is excluded
            sa[0] = sb[0] = -float("inf")
        assert p[row] == 4 + int(sa.argmax()) and q[row] == 4 + int(sb.argmax())

    state = queue.state_dict()
    other = NeighborQueue(size=8, image_dim=6, text_dim=5, include_batch=False)
    other.load_state_dict(state)
    assert torch.equal(other.query(index, qa, qb)[0], p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_queue_on_the_gpu_equals_the_cpu_queue():
    torch.manual_seed(1)
    cpu, gpu = NeighborQueue(16, 6, 5), NeighborQueue(16, 6, 5, device="cuda")
    for step in range(3):
        index, a, b = torch.arange(step * 8, step * 8 + 8), torch.randn(8, 6), torch.randn(8, 5)
        p_cpu, q_cpu = cpu.query(index, a, b)
        p_gpu, q_gpu = gpu.query(index.cuda(), a.cuda(), b.cuda())
        assert p_gpu.device.type == "cuda" and torch.equal(p_gpu.cpu(), p_cpu) and torch.equal(q_gpu.cpu(), q_cpu)
        cpu.push(index, a, b)
        gpu.push(index.cuda(), a.cuda(), b.cuda())
    assert all(v.device.type == "cpu" for v in gpu.state_dict().values() if isinstance(v, torch.Tensor))


def test_queue_empty_searches_the_batch():
    queue = NeighborQueue(size=4, image_dim=3, text_dim=3)
    keys = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.2, 0, 1.0]])
    p, q = queue.query(torch.tensor([10, 11, 12]), keys, keys)
    assert p.tolist() == [11, 10, 10] and q.tolist() == [11, 10, 10]
    single, _ = queue.query(torch.tensor([5]), keys[:1], keys[:1])
    assert single.tolist() == [5]  # nothing else to pick: itself


# --------------------------------------------------------------------------- HTML page


def make_dataset_with_bank(root: Path, n: int = 24) -> tuple[Path, Path]:
    """Tiny coloured-square data set (label column 'color') and a bank whose features follow the colour."""
    from PIL import Image

    from clip_ping.data.csv_reader import read_pairs

    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    names = list(colors)
    (root / "images").mkdir(parents=True)
    lines = ["filepath,caption,color"]
    for i in range(n):
        color = names[i % 3]
        Image.new("RGB", (20, 20), colors[color]).save(root / "images" / f"img {i}.png")
        lines.append(f"images/img {i}.png,a {color} square number {i},{color}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(0)
    onehot = np.eye(3)[np.arange(n) % 3]
    bank = make_bank(root / "banks", n=n)
    for name, d in (("image.npy", 24), ("text.npy", 16)):
        x = np.concatenate([onehot * 3, rng.standard_normal((n, d - 3))], axis=1)
        np.save(bank / name, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
    manifest = {"count": n, "fingerprint": "fp-x", "data_fingerprint": read_pairs(root / "train.csv").fingerprint()}
    (bank / "manifest.json").write_text(json.dumps(manifest))
    build_neighbors(NeighborsConfig(banks=str(bank), k=3, method="exact", progress=False))
    return root / "train.csv", bank


@pytest.mark.parametrize("embed", [False, True])
def test_neighbor_page_is_written_and_references_existing_images(tmp_path, embed):
    import base64
    import io
    import re
    import urllib.parse

    from PIL import Image

    from clip_ping.knn import write_neighbor_page

    csv, bank = make_dataset_with_bank(tmp_path / "data")
    out = tmp_path / "page" / "neighbors.html"
    result = write_neighbor_page(csv, bank, out, n=10, seed=0, embed=embed)
    page = out.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert result["shown"] == 10 and len(srcs) == 30  # sample, p and q per row
    for src in srcs:
        if embed:
            assert src.startswith("data:image/jpeg;base64,")
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
        else:
            assert (out.parent / urllib.parse.unquote(src)).is_file()
    assert "a red square number" in page
    colour = result["label_agreement"]["color"]
    # features follow the colour, so neighbours share it far above chance (1/3)
    assert colour["image_side_top1"] > 0.9 and colour["text_side_top1"] > 0.9
    assert abs(colour["chance"] - 1 / 3) < 0.01


def test_show_neighbors_cli_config(tmp_path):
    from clip_ping.knn import ShowConfig, show_neighbors

    csv, bank = make_dataset_with_bank(tmp_path / "data")
    result = show_neighbors(ShowConfig(data=str(tmp_path / "data"), samples=5))
    assert Path(result["html"]) == bank / "neighbors.html" and (bank / "neighbors.html").is_file()
    other = tmp_path / "data" / "other.csv"
    other.write_text(csv.read_text().replace("number 3,", "number three,"))
    with pytest.raises(DataError, match="another data set"):
        show_neighbors(ShowConfig(data=str(other), banks=str(bank)))


def _without_faiss(monkeypatch):
    """As on a GPU node without a FAISS build: `has_extra('faiss-cpu')` is False and importing faiss fails."""
    import builtins

    from clip_ping import environment

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    real_has = environment.has_extra
    fake_has = lambda extra: False if extra == "faiss-cpu" else real_has(extra)  # noqa: E731
    monkeypatch.setattr(builtins, "__import__", no_faiss)
    for module in (environment, nb_search, nb_tiled):
        monkeypatch.setattr(module, "has_extra", fake_has)


def test_fast_search_needs_no_faiss(monkeypatch):
    """The exact tiled search runs on torch alone (the CUDA path's merge on the CPU) and equals brute force."""
    _without_faiss(monkeypatch)
    monkeypatch.setattr(nb_tiled, "FAST_TILE_BYTES", 64 * 64 * 4)
    x, groups, valid = with_duplicates(400, 12, seed=3)
    stats: dict = {}
    idx, scores = search_neighbors(x, 4, groups=groups, valid=valid, method="fast", stats=stats)
    ref_i, ref_s = brute_force(x, 4, groups, valid)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-6)
    assert stats["method"] == "fast"


def test_an_index_method_without_faiss_is_one_line_naming_the_extra(monkeypatch):
    from clip_ping.environment import SetupError

    _without_faiss(monkeypatch)
    with pytest.raises(SetupError, match=r"needs faiss.*pip install 'clip-ping\[faiss-cpu\]'"):
        search_neighbors(clustered(300, 8, 3), 3, method="ivf")


@pytest.mark.cuda
@pytest.mark.parametrize("tiles", ["bf16", "fp32"])
def test_fast_search_on_cuda_equals_brute_force(tiles):
    """The same search on the GPU (bf16 or fp32 tiles, torch merge): exact after certification."""
    x, groups, valid = with_duplicates(3000, 64, seed=5)
    stats: dict = {}
    idx, scores = search_neighbors(x, 5, groups=groups, valid=valid, method="fast", device="cuda", tiles=tiles,
                                   stats=stats)
    ref_i, ref_s = brute_force(x, 5, groups, valid)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    assert stats["tiles"] == tiles
