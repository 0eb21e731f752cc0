"""Neighbour search benchmark: FAISS IndexFlatIP vs the fast path (fp32 / bf16 tiles), IVF and HNSW.

Default: 100,000 x 384 synthetic L2-normalised features with realistic
structure (a Gaussian mixture of clusters of unequal size and spread, stored as
float16 like a bank). FAISS ``IndexFlatIP`` and the fast path run interleaved
(A, B, A, B, ...) for ``--repeats`` rounds; medians, spread and the load average
are reported. Prints a summary and writes benchmarks/results/neighbors.json.

    .venv/bin/python benchmarks/bench_neighbors.py --repeats 3            # ~10-20 minutes on 2 cores
    .venv/bin/python benchmarks/bench_neighbors.py --repeats 3 --no-approx --profile
    .venv/bin/python benchmarks/bench_neighbors.py --repeats 3 --no-approx --tiles fp32 bf16   # both precisions
    .venv/bin/python benchmarks/bench_neighbors.py --big      # 1,000,000 x 384, approximate path only
    .venv/bin/python benchmarks/bench_neighbors.py --big --big-queries 0   # ... searching all 1M rows

``--big`` runs in its own process (peak memory = this process's maxrss) and
adds a "big" entry to the same JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine_facts  # noqa: E402
from _common import stats as summary  # noqa: E402

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip_ping.knn import (  # noqa: E402
    default_nlist,
    search_neighbors,
    set_faiss_threads,
)

RESULTS = Path(__file__).resolve().parent / "results" / "neighbors.json"


def synthetic_bank(n: int, d: int, seed: int = 0) -> np.ndarray:
    """float16 N x d unit rows: ~n/100 clusters, Zipf-like sizes, per-cluster spread.

    Cluster centres share a common component (real teacher features are not
    isotropic), so top-1 cosines land around 0.5-0.9 as with real teachers.
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(10, n // 100)
    common = rng.standard_normal(d).astype(np.float32)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32) + 0.5 * common
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.7
    label = rng.choice(n_clusters, size=n, p=weights / weights.sum())
    spread = rng.uniform(0.5, 1.5, n_clusters).astype(np.float32)
    out = np.empty((n, d), dtype=np.float16)
    for start in range(0, n, 100_000):  # chunks keep the float32 temporaries small at 1M rows
        lab = label[start:start + 100_000]
        x = centers[lab] + spread[lab, None] * rng.standard_normal((len(lab), d)).astype(np.float32) / np.sqrt(d)
        out[start:start + len(lab)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def matmul_peak(dtype: torch.dtype, repeats: int = 5) -> float:
    """Best GFLOP/s of a (4096 x 384) @ (384 x 16384) product (the shape of a search block)."""
    a = torch.randn(4096, 384).to(dtype)
    b = torch.randn(16384, 384).to(dtype)
    a @ b.T  # warm-up (oneDNN kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * 16384 * 384 / best / 1e9


def cpu_seconds() -> float:
    """CPU time of this process (all threads): less sensitive than wall time to other jobs on the machine."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def faiss_flat_raw(x: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Plain FAISS IndexFlatIP over all rows, k = fetch (the baseline, no exclusion logic)."""
    import faiss

    x32 = x.astype(np.float32)
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x32)
    scores, idx = index.search(x32, fetch)
    return idx, scores, time.perf_counter() - t0


def recall(approx: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """recall@1 (same top-1) and recall@k (share of the exact top-k found)."""
    k = exact.shape[1]
    found = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)])
    return {"recall_at_1": float((approx[:, 0] == exact[:, 0]).mean()), f"recall_at_{k}": float(found)}


def exact_for_queries(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact fp32 top-k (self excluded) of a few query rows against the whole bank, in blocks."""
    q = torch.from_numpy(x[queries].astype(np.float32))
    best_s = torch.full((len(queries), k), -float("inf"))
    best_i = torch.zeros((len(queries), k), dtype=torch.int64)
    for start in range(0, len(x), 100_000):
        block = torch.from_numpy(x[start:start + 100_000].astype(np.float32))
        s = q @ block.T
        local = queries - start  # a query's own row, if it lies in this block, is excluded
        inside = (local >= 0) & (local < s.shape[1])
        s[torch.from_numpy(np.flatnonzero(inside)), torch.from_numpy(local[inside])] = -float("inf")
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, torch.arange(start, start + s.shape[1]).expand_as(s)], 1)
        best_s, pos = s.topk(k, dim=1)
        best_i = torch.gather(i, 1, pos)
    return best_i.numpy()


def run_default(args: argparse.Namespace) -> dict[str, Any]:
    n, d, k = args.n, args.d, args.k
    print(f"data: {n:,} x {d} clustered, float16; k={k}; {torch.get_num_threads()} threads", flush=True)
    x = synthetic_bank(n, d, args.seed)
    flops = 2.0 * n * n * d
    res: dict[str, Any] = {"n": n, "d": d, "k": k, "machine": machine_facts()}

    res["peak_gflops"] = {"fp32": round(matmul_peak(torch.float32), 1), "bf16": round(matmul_peak(torch.bfloat16), 1)}
    print(f"matmul peak: fp32 {res['peak_gflops']['fp32']} GFLOP/s, bf16 {res['peak_gflops']['bf16']} GFLOP/s", flush=True)

    # Interleave baseline and fast path (each tile precision) so a noisy neighbour on the machine hurts all alike.
    fast_times: dict[str, list[float]] = {t: [] for t in args.tiles}
    faiss_times: list[float] = []
    fast_out: dict[str, Any] = {}
    for rep in range(args.repeats):
        # k + 2: the row itself (FAISS does not exclude it) and one more to spot near-ties at the k-th place
        c0 = cpu_seconds()
        (ff_i, ff_s, t_faiss) = faiss_flat_raw(x, k + 2)
        cpu_faiss = cpu_seconds() - c0
        faiss_times.append(t_faiss)
        line = f"  run {rep + 1}: FAISS IndexFlatIP {t_faiss:.1f} s ({cpu_faiss:.0f} CPU s)"
        for tiles in args.tiles:
            stats: dict[str, Any] = {}
            c1 = cpu_seconds()
            out, t_fast = timed(lambda: search_neighbors(x, k, method="fast", tiles=tiles, stats=stats))
            fast_times[tiles].append(t_fast)
            fast_out[tiles] = (*out, stats, cpu_seconds() - c1)
            line += (f", fast ({stats['tiles']} tiles) {t_fast:.1f} s ({fast_out[tiles][3]:.0f} CPU s; uncertified "
                     f"rows re-searched: {stats.get('fast_uncertified_rows')})")
        print(line, flush=True)
    fs = summary(faiss_times)
    t_faiss = fs["median"]

    # Exact reference: the FAISS result without each row itself.
    not_self = ff_i != np.arange(n)[:, None]
    order = np.argsort(~not_self, axis=1, kind="stable")[:, : k + 1]
    ex_i, ex_s = np.take_along_axis(ff_i, order, 1), np.take_along_axis(ff_s, order, 1)
    clear = ex_s[:, k - 1] - ex_s[:, k] > 1e-5  # rows without a near-tie at the k-th place
    res["faiss_flat"] = {"time_s": round(t_faiss, 2), "median_s": round(t_faiss, 2), "min_s": round(fs["min"], 2),
                         "max_s": round(fs["max"], 2), "times_s": [round(t, 2) for t in faiss_times],
                         "cpu_s_last": round(cpu_faiss, 1), "gflops": round(flops / t_faiss / 1e9, 1)}
    print(f"FAISS IndexFlatIP: median {t_faiss:.1f} s (min {fs['min']:.1f}, max {fs['max']:.1f}; "
          f"{res['faiss_flat']['gflops']} GFLOP/s)", flush=True)
    res["fast_by_tiles"] = {}
    for tiles in args.tiles:
        fa_i, fa_s, stats, cpu_fast = fast_out[tiles]
        ts = summary(fast_times[tiles])
        ratios = [a / b for a, b in zip(faiss_times, fast_times[tiles])]
        t_fast = ts["median"]
        entry = {
            "tiles": stats["tiles"],
            "time_s": round(t_fast, 2), "median_s": round(t_fast, 2), "min_s": round(ts["min"], 2),
            "max_s": round(ts["max"], 2), "times_s": [round(t, 2) for t in fast_times[tiles]],
            "cpu_s_last": round(cpu_fast, 1),
            "speedup_per_round": [round(r, 2) for r in ratios],
            "speedup_median": round(summary(ratios)["median"], 2),
            "gflops": round(flops / t_fast / 1e9, 1),
            "speedup_vs_faiss_flat": round(t_faiss / t_fast, 2),
            "top1_agreement": float((fa_i[:, 0] == ex_i[:, 0]).mean()),
            "topk_set_agreement": float(np.mean([set(a) == set(b) for a, b in zip(fa_i, ex_i[:, :k])])),
            "topk_set_agreement_without_ties": float(np.mean([set(a) == set(b) for a, b in
                                                              zip(fa_i[clear], ex_i[clear, :k])])),
            "max_score_diff": float(np.abs(fa_s - ex_s[:, :k]).max()),
            "uncertified_rows": stats.get("fast_uncertified_rows"),
        }
        res["fast_by_tiles"][tiles] = entry
        print(f"fast ({entry['tiles']} tiles): median {t_fast:.1f} s (min {ts['min']:.1f}, max {ts['max']:.1f}; "
              f"{entry['gflops']} GFLOP/s) = {entry['speedup_vs_faiss_flat']}x FAISS (per round: "
              f"{entry['speedup_per_round']}); top-1 agreement {entry['top1_agreement']:.5f}, top-{k} sets "
              f"{entry['topk_set_agreement']:.5f}", flush=True)
    res["fast"] = res["fast_by_tiles"][args.tiles[0]]
    res["mean_top1_cosine"] = float(ex_s[:, 0].mean())

    if args.profile:
        res["fast_profile"] = profile_fast(x, k)
    approx = () if args.no_approx else (("ivf", {"method": "ivf", "nprobe": args.nprobe or None}),
                                         ("hnsw", {"method": "hnsw"}))
    for name, kwargs in approx:
        st: dict[str, Any] = {}
        (ap_i, _), t = timed(lambda: search_neighbors(x, k, stats=st, **kwargs))
        res[name] = {"time_s": round(t, 2), "index_s": st["index_s"], "rows_researched": st["rows_researched"],
                     **recall(ap_i, ex_i[:, :k])}
        if name == "ivf":
            res[name].update(nlist=st["nlist"], nprobe=st["nprobe"])
        print(f"{name}: {t:.1f} s (index {st['index_s']:.1f} s), recall@1 {res[name]['recall_at_1']:.4f}, "
              f"recall@{k} {res[name][f'recall_at_{k}']:.4f}", flush=True)
    res["machine"]["load_avg_end"] = load_average()
    print(f"load average: start {res['machine']['load_avg_start']}, end {res['machine']['load_avg_end']}", flush=True)
    return res


def profile_fast(x: np.ndarray, k: int, top: int = 12) -> list[dict[str, Any]]:
    """Where the fast path's time goes: torch operators by self CPU time, one run."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        search_neighbors(x, k, method="fast")
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    out = [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 2), "share": round(e.self_cpu_time_total / total, 3),
            "calls": e.count} for e in rows[:top]]
    # the tile products run in NumPy's BLAS: their time is the self time of the named range
    out += [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 2), "share": round(e.self_cpu_time_total / total, 3),
             "calls": e.count} for e in rows[top:] if e.key == "neighbors.tile_product"]
    print("fast path profile (self CPU time):")
    for r in out:
        print(f"  {r['op']:<28} {r['self_cpu_s']:8.2f} s  {100 * r['share']:5.1f} %  {r['calls']} calls")
    return out


def run_big(args: argparse.Namespace) -> dict[str, Any]:
    """1M rows: the IVF index over all rows, searched for ``--big-queries`` random rows.

    The full self-join time is extrapolated (index time + search time x N / queries)
    unless ``--big-queries 0`` searches every row. Recall is measured on
    ``--recall-queries`` of the searched rows against exact fp32 brute force.
    """
    n, d, k = args.big_n, args.d, args.k
    print(f"big: {n:,} x {d} clustered, float16; k={k}; IVF nlist {default_nlist(n)}", flush=True)
    x, t_data = timed(lambda: synthetic_bank(n, d, args.seed))
    res: dict[str, Any] = {"n": n, "d": d, "k": k, "machine": machine_facts(), "data_s": round(t_data, 1)}
    rng = np.random.default_rng(1)
    queries = np.sort(rng.choice(n, size=args.big_queries, replace=False)) if args.big_queries else None
    st: dict[str, Any] = {}
    (ap_i, _), t = timed(lambda: search_neighbors(x, k, method="ivf", nprobe=args.nprobe or None, stats=st,
                                                progress=True, desc="ivf 1M", query_rows=queries))
    n_searched = n if queries is None else len(queries)
    search_s = st["search_s"] - st["index_s"]
    check = rng.choice(n_searched, size=min(args.recall_queries, n_searched), replace=False)
    rows = check if queries is None else queries[check]
    ref, t_ref = timed(lambda: exact_for_queries(x, rows, k))
    res["ivf"] = {"index_s": st["index_s"], "search_s": round(search_s, 1), "queries_searched": n_searched,
                  "full_self_join_s": round(st["index_s"] + search_s * n / n_searched, 0),
                  "extrapolated": queries is not None, "nlist": st["nlist"], "nprobe": st["nprobe"],
                  "rows_researched": st["rows_researched"], "recall_queries": len(rows),
                  **recall(ap_i[check], ref)}
    res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    res["exact_fp32_estimate_s"] = round(t_ref / len(rows) * n, 0)  # brute force, extrapolated from the check
    res["machine"]["load_avg_end"] = os.getloadavg()
    print(f"ivf 1M: index {st['index_s']:.0f} s, search {search_s:.0f} s for {n_searched:,} queries "
          f"-> full self-join {res['ivf']['full_self_join_s']:.0f} s; nprobe {st['nprobe']}/{st['nlist']}, "
          f"recall@1 {res['ivf']['recall_at_1']:.4f}, recall@{k} {res['ivf'][f'recall_at_{k}']:.4f} "
          f"(on {len(rows)} queries), peak RSS {res['peak_rss_gib']} GiB", flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved FAISS/fast rounds (median and spread)")
    parser.add_argument("--no-approx", action="store_true", help="skip IVF and HNSW in the default run")
    parser.add_argument("--tiles", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"],
                        help="tile precisions of the fast path, each timed in every round")
    parser.add_argument("--profile", action="store_true", help="profile one fast run (torch operators)")
    parser.add_argument("--nprobe", type=int, default=0, help="IVF lists probed (0: automatic)")
    parser.add_argument("--big", action="store_true", help="1,000,000 rows, approximate (IVF) path only")
    parser.add_argument("--big-n", type=int, default=1_000_000)
    parser.add_argument("--big-queries", type=int, default=100_000,
                        help="rows searched in --big (0: all; otherwise the full time is extrapolated)")
    parser.add_argument("--recall-queries", type=int, default=2000, help="queries checked against exact (--big)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    set_faiss_threads()

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.big:
        results["big"] = run_big(args)
    else:
        results["default"] = run_default(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
