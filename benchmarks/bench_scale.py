"""Neighbour search at scale: approximate recall and time, exact time, peak memory, sizes on disk.

A synthetic clustered bank (`bench_neighbors.synthetic_bank`: unit rows, Zipf-sized
clusters, float16 like a real bank) of ``--n`` rows is written to a memmap, then
each stage runs in its own process (so its peak RSS is its own):

- each approximate method of ``--approx`` (``ivf``: FAISS IVF-Flat; ``ivfpq``: IVF with
  4-bit PQ and exact re-scoring of ``--k-factor`` x candidates) with the default nlist
  (~4 sqrt(N)) and each ``--nprobe`` (``auto`` = the method's default: nlist / 16 for
  ivf, nlist / 4 for ivfpq); ``--queries`` rows searched (the full self-join time is
  *projected* from them unless ``--queries 0``), recall@1 and recall@k on
  ``--recall-queries`` of them against exact search;
- ``fast``: the exact tiled search on the first ``--exact-n`` rows (streamed from the
  memmap), projected to N by its N^2 cost (labelled as a projection), in 1 process and,
  with ``--processes 1 2``, in 2 processes under torchrun (gloo; each process takes every
  other row of tiles; peak RSS per process);
- ``extract`` (``--extract-rows``): teacher extraction throughput (rows/s, default
  teachers, ``--extract-precision``) on that many rows of the built-in synthetic data.

Projections to 3M and 12M rows use the measured rates and the FLOP count; they are
labelled as such; the approximate projection takes the fastest setting that
reaches recall@1 0.99 (else the one of best recall). Results go to
benchmarks/results/scale.json.

    .venv/bin/python benchmarks/bench_scale.py --n 1000000 --approx ivfpq --queries 20000 --exact-n 50000
    .venv/bin/python benchmarks/bench_scale.py --n 200000 --approx ivf ivfpq --nprobe auto 200
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import load_average, machine_facts  # noqa: E402
from bench_neighbors import recall, synthetic_bank  # noqa: E402

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def stage(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process (called through ``--stage``)."""
    from clip_ping.knn import default_nlist, search_neighbors

    x = np.load(args.bank, mmap_mode="r")
    n, k = x.shape[0], args.k
    rng = np.random.default_rng(1)
    if args.stage == "fast":
        from clip_ping.distributed import init_from_env, rank_and_world

        init_from_env()
        sub = x[: args.exact_n]
        st: dict[str, Any] = {}
        t0 = time.perf_counter()
        search_neighbors(sub, k, method="fast", stats=st)
        rank, world = rank_and_world()
        out = {"rows": len(sub), "processes": world, "time_s": round(time.perf_counter() - t0, 1),
               "tiles": st.get("tiles"), "uncertified_rows": st.get("fast_uncertified_rows"),
               "peak_rss_gib": peak_rss_gib()}
        if world > 1:
            import torch.distributed as dist

            rss: list[Any] = [None] * world
            dist.all_gather_object(rss, out["peak_rss_gib"])
            out["peak_rss_gib_per_process"] = rss
            dist.destroy_process_group()
            if rank:
                sys.exit(0)  # only the first process prints the result
        return out
    if args.stage == "reference":
        queries = np.sort(rng.choice(n, size=args.queries, replace=False)) if args.queries else np.arange(n)
        check = queries[np.sort(rng.choice(len(queries), size=min(args.recall_queries, len(queries)), replace=False))]
        t0 = time.perf_counter()
        ref, _ = search_neighbors(x, k, method="fast", query_rows=check)
        np.save(args.out_ref, ref)
        return {"queries": len(check), "time_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": peak_rss_gib()}
    # an approximate method
    queries = np.sort(rng.choice(n, size=args.queries, replace=False)) if args.queries else None
    n_q = n if queries is None else len(queries)
    check_pos = np.sort(rng.choice(n_q, size=min(args.recall_queries, n_q), replace=False))
    nprobe = None if args.stage_nprobe == "auto" else int(args.stage_nprobe)
    st = {}
    t0 = time.perf_counter()
    idx, _ = search_neighbors(x, k, method=args.stage_method, nprobe=nprobe, k_factor=args.k_factor, stats=st,
                              query_rows=queries)
    search_s = st["search_s"] - st["index_s"]
    ref = np.load(args.out_ref)
    return {"method": args.stage_method, "k_factor": st.get("k_factor"), "nlist": st["nlist"], "nprobe": st["nprobe"],
            "default_nlist": default_nlist(n),
            "index_s": st["index_s"], "search_s": round(search_s, 1), "queries_searched": n_q,
            "self_join_s": round(st["index_s"] + search_s * n / n_q, 0), "self_join_projected": queries is not None,
            "wall_s": round(time.perf_counter() - t0, 1), "rows_researched": st["rows_researched"],
            **recall(idx[check_pos], ref), "peak_rss_gib": peak_rss_gib()}


def extract_rate(rows: int, precision: str) -> dict[str, Any]:
    """Teacher extraction (default teachers, 2 loader workers) on ``rows`` built-in synthetic pairs."""
    from clip_ping.banks import ExtractConfig, extract_banks
    from clip_ping.data.synth import SynthConfig, generate_synthetic

    with tempfile.TemporaryDirectory(prefix="bench-scale-extract-") as tmp:
        generate_synthetic(SynthConfig(out=f"{tmp}/data", n_train=rows, n_val=8, n_test=8, seed=0))
        t0 = time.perf_counter()
        extract_banks(ExtractConfig(data=f"{tmp}/data/train.csv", out=f"{tmp}/banks", precision=precision,
                                    progress=False))
        wall = time.perf_counter() - t0
    return {"rows": rows, "precision": precision, "time_s": round(wall, 1), "rows_per_s": round(rows / wall, 1),
            "note": "includes loading the teachers", "peak_rss_gib": peak_rss_gib()}


def run_stage(args: argparse.Namespace, name: str, extra: list[str], processes: int = 1) -> dict[str, Any]:
    launcher = [sys.executable]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*launcher, __file__, "--stage", name, "--bank", str(args.bank), "--k", str(args.k),
           "--queries", str(args.queries), "--recall-queries", str(args.recall_queries),
           "--exact-n", str(args.exact_n), "--out-ref", str(args.out_ref), "--k-factor", str(args.k_factor), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--approx", nargs="+", default=["ivfpq"], choices=["ivf", "ivfpq"],
                        help="approximate methods measured")
    parser.add_argument("--nprobe", nargs="+", default=["auto"],
                        help="nprobe values (auto = the method's default: nlist/16 for ivf, nlist/4 for ivfpq)")
    parser.add_argument("--k-factor", type=int, default=32, help="ivfpq: candidates re-scored per fetched row")
    parser.add_argument("--queries", type=int, default=20_000, help="rows the approximate search takes (0: all)")
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--exact-n", type=int, default=50_000, help="rows of the exact (fast) timing run")
    parser.add_argument("--processes", type=int, nargs="+", default=[1], help="process counts of the exact run")
    parser.add_argument("--extract-rows", type=int, default=0, help="rows of the extraction throughput run (0: none)")
    parser.add_argument("--extract-precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--stage-nprobe", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--stage-method", default="ivfpq", help=argparse.SUPPRESS)
    parser.add_argument("--bank", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-ref", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "extract":
        print(json.dumps(extract_rate(args.extract_rows, args.extract_precision)))
        return
    if args.stage:
        print(json.dumps(stage(args)))
        return

    res: dict[str, Any] = {"n": args.n, "d": args.d, "k": args.k, "machine": machine_facts()}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        args.bank, args.out_ref = Path(tmp) / "image.npy", Path(tmp) / "reference.npy"
        t0 = time.perf_counter()
        np.save(args.bank, synthetic_bank(args.n, args.d))
        res["data_s"] = round(time.perf_counter() - t0, 1)
        res["bank_bytes"] = args.bank.stat().st_size
        res["table_bytes"] = 2 * args.n * args.k * (8 + 4)  # image + text side: int64 indices, float32 scores
        print(f"bank {args.n:,} x {args.d} float16: {res['bank_bytes'] / 2**30:.2f} GiB; tables "
              f"{res['table_bytes'] / 2**30:.2f} GiB", flush=True)
        res["reference"] = run_stage(args, "reference", [])
        print(f"exact reference for {res['reference']['queries']} queries: {res['reference']['time_s']} s", flush=True)
        res["approx"] = []
        for method in args.approx:
            for nprobe in args.nprobe:
                r = run_stage(args, "approx", ["--stage-method", method, "--stage-nprobe", nprobe])
                res["approx"].append(r)
                print(f"{method} nlist {r['nlist']} nprobe {r['nprobe']}: index {r['index_s']:.0f} s, "
                      f"search {r['search_s']:.0f} s for {r['queries_searched']:,} rows -> self-join "
                      f"{r['self_join_s']:.0f} s"
                      f"{' (projected)' if r['self_join_projected'] else ''}; recall@1 {r['recall_at_1']:.4f}, "
                      f"recall@{args.k} {r[f'recall_at_{args.k}']:.4f}; peak RSS {r['peak_rss_gib']} GiB", flush=True)
        if args.extract_rows:
            res["extract"] = run_stage(args, "extract", ["--extract-rows", str(args.extract_rows),
                                                         "--extract-precision", args.extract_precision])
            print(f"extraction: {res['extract']['rows_per_s']} rows/s ({args.extract_precision})", flush=True)
        if args.exact_n:
            res["fast_by_processes"] = {}
            for procs in args.processes:
                r = run_stage(args, "fast", [], processes=procs)
                scale = (args.n / r["rows"]) ** 2
                r["self_join_projected_s"] = round(r["time_s"] * scale, 0)
                res["fast_by_processes"][str(procs)] = r
                print(f"exact (fast, {r['tiles']} tiles, {procs} process(es)) on {r['rows']:,} rows: {r['time_s']} s, "
                      f"peak RSS {r.get('peak_rss_gib_per_process', r['peak_rss_gib'])} GiB -> {args.n:,} rows "
                      f"projected (N^2) {r['self_join_projected_s']:.0f} s", flush=True)
            r = res["fast"] = res["fast_by_processes"][str(args.processes[0])]
            rate = r["rows"] ** 2 * args.d / r["time_s"]  # multiply-adds per second of the half self-join
            res["projection"] = {  # labelled: from the measured rate and the N^2 d FLOP count
                f"{m}M_exact_s": round((m * 1e6) ** 2 * args.d / rate, 0) for m in (3, 12)}
            good = [a for a in res["approx"] if a["recall_at_1"] >= 0.99]
            best = (min(good, key=lambda a: a["self_join_s"]) if good
                    else max(res["approx"], key=lambda a: a["recall_at_1"]))
            # IVF scans nprobe / nlist of the rows per query: N^2 when nprobe grows with nlist, N^1.5 when fixed
            power = 1.5 if best["nprobe"] == 32 else 2.0
            res["projection"]["approx_method"] = {k: best[k] for k in ("method", "nprobe", "k_factor", "recall_at_1")}
            res["projection"].update({f"{m}M_approx_s": round(best["self_join_s"] * (m * 1e6 / args.n) ** power, 0)
                                      for m in (3, 12)})
            print(f"projected (from measured rates and FLOP counts): {res['projection']}", flush=True)
    res["machine"]["load_avg_end"] = load_average()
    print(f"load average: start {res['machine']['load_avg_start']}, end {res['machine']['load_avg_end']}")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[str(args.n)] = res
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
