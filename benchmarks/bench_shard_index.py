"""Memory of a shard index of N rows: Python lists of str (format 1's reader) vs compact columns.

A synthetic index (keys like img2dataset's ``000123456``, captions of 6-14 words
from a 2,000-word vocabulary, about CC3M's length) is held three ways, each in its
own process (so its memory is its own), the three interleaved over ``--repeats``:

- ``list``: keys, captions and extensions as lists of str, the key index over the
  list (what `ShardTable` held before format 2);
- ``columns``: `StringColumn` / `CodedColumn` built in memory (`index_shards`, or a
  format-1 index read);
- ``mapped``: the same columns memory-mapped from a format-2 index file
  (`open_shards`), the key index read from the file, not rebuilt.

Per variant: resident memory added (anonymous = private to the process, and total),
bytes per row beyond the UTF-8 text, the peak RSS above the start (building included;
the peak is reset before, through /proc/self/clear_refs), the time of 100,000
key lookups, the time of the data fingerprint (sha256 over key, caption and size; the
three must agree), and the private memory a forked loader worker adds when it reads
every caption (reference counts written into list pages copy them; column pages are
never written).

    .venv/bin/python benchmarks/bench_shard_index.py --n 1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import load_average, machine_facts  # noqa: E402

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "shard_index.json"
VARIANTS = ("list", "columns", "mapped")


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Keys, captions and image extensions of n rows (deterministic)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(m))) for m in rng.integers(3, 10, 2000)]
    counts = rng.integers(6, 15, n)
    words = rng.integers(0, len(vocab), int(counts.sum())).tolist()
    captions, pos = [], 0
    for c in counts.tolist():
        captions.append(" ".join(vocab[w] for w in words[pos:pos + c]))
        pos += c
    keys = [f"{i:09d}" for i in range(n)]
    exts = ["jpg"] * n
    return keys, captions, exts


def memory() -> dict[str, int]:
    """Resident bytes of this process: total, anonymous (private) and file-backed."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) * 1024
    return out


def private_dirty() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_reads_everything(captions: Any, keys: Any) -> int:
    """Private bytes a forked child adds by reading every caption and key (what a loader worker does)."""
    r, w = os.pipe()
    # fork on purpose: DataLoader workers are forked, and their copy-on-write cost is the measurement
    pid = os.fork()
    if pid == 0:  # child: nothing here starts threads
        os.close(r)
        before = private_dirty()
        total = sum(len(c) for c in captions) + sum(len(k) for k in keys)
        os.write(w, json.dumps([private_dirty() - before, total]).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return int(json.loads(data)[0])


def stage(variant: str, n: int, index: Path) -> dict[str, Any]:
    from clip_ping.data.shard_index import CodedColumn, KeyIndex, StringColumn, read_index, rows_fingerprint

    rng = np.random.default_rng(1)
    probe = rng.integers(0, n, 100_000)
    probe_keys = [f"{i:09d}" for i in probe.tolist()]
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    m0 = memory()
    t0 = time.perf_counter()
    if variant == "mapped":
        layout = json.loads(index.with_suffix(".json").read_text())
        a = read_index(index, layout)
        keys = StringColumn(a["keys.data"], a["keys.ends"])
        captions: Any = StringColumn(a["captions.data"], a["captions.ends"])
        exts: Any = CodedColumn(a["exts"], ["jpg"])
        key_index = KeyIndex(keys, a["key_hashes"], a["key_order"])
    else:
        k, captions, exts = synthetic(n)
        if variant == "columns":
            keys, captions, exts = StringColumn.from_strings(k), StringColumn.from_strings(captions), \
                CodedColumn.from_strings(exts)
            del k
        else:
            keys = k  # type: ignore[assignment]
        key_index = KeyIndex(keys)
    gc.collect()
    build_s = time.perf_counter() - t0
    m1 = memory()
    t0 = time.perf_counter()
    found = [key_index.get(key) for key in probe_keys]
    lookup_s = time.perf_counter() - t0
    assert found == probe.tolist(), "lookup returned a wrong row"
    assert len(exts) == n
    m2 = memory()
    worker = worker_reads_everything(captions, keys)
    sizes = np.arange(n, dtype=np.int64) + 50_000
    t0 = time.perf_counter()
    if variant == "list":  # the row-by-row hash lists were fingerprinted with
        h = hashlib.sha256()
        for key, caption, size in zip(keys, captions, sizes.tolist()):
            h.update(f"{key}\0{caption}\0{size}\n".encode("utf-8", "surrogateescape"))
        fingerprint = h.hexdigest()
    else:
        fingerprint = rows_fingerprint(keys, captions, sizes)
    fingerprint_s = time.perf_counter() - t0
    return {"variant": variant, "build_s": round(build_s, 2), "lookup_100k_s": round(lookup_s, 3),
            "fingerprint_s": round(fingerprint_s, 3), "fingerprint": fingerprint,
            "anon_bytes": m1["RssAnon"] - m0["RssAnon"], "rss_bytes": m1["VmRSS"] - m0["VmRSS"],
            "rss_after_lookups_bytes": m2["VmRSS"] - m0["VmRSS"],
            "peak_rss_bytes": memory()["VmHWM"] - m0["VmRSS"],
            "worker_private_bytes": worker}


def write_mapped_index(n: int, path: Path) -> int:
    """A format-2 style index file of the synthetic rows; returns the bytes of UTF-8 text."""
    from clip_ping.data.shard_index import CodedColumn, KeyIndex, StringColumn, write_index

    k, c, e = synthetic(n)
    keys, captions, exts = StringColumn.from_strings(k), StringColumn.from_strings(c), CodedColumn.from_strings(e)
    ki = KeyIndex(keys)
    layout = write_index(path, {"keys.data": keys.data, "keys.ends": keys.ends, "captions.data": captions.data,
                                "captions.ends": captions.ends, "exts": exts.codes, "key_hashes": ki._sorted,
                                "key_order": ki._order})
    path.with_suffix(".json").write_text(json.dumps(layout))
    return int(keys.data.nbytes + captions.data.nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stage", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.n, args.index)))
        return

    res: dict[str, Any] = {"n": args.n, "machine": machine_facts()}
    with tempfile.TemporaryDirectory(prefix="bench-shard-index-") as tmp:
        index = Path(tmp) / "train.index.bin"
        text = write_mapped_index(args.n, index)
        res["text_bytes"], res["index_file_bytes"] = text, index.stat().st_size
        print(f"{args.n:,} rows: {text / 2**20:.1f} MiB of UTF-8 text (keys + captions); "
              f"index file {index.stat().st_size / 2**20:.1f} MiB", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]  # interleaved, alternating order
            for v in order:
                cmd = [sys.executable, __file__, "--stage", v, "--n", str(args.n), "--index", str(index)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    res["runs"] = runs
    mib = 2**20
    print(f"\n{'variant':8} {'anon MiB':>9} {'RSS MiB':>8} {'B/row beyond text':>18} {'peak MiB':>9} "
          f"{'100k lookups s':>15} {'worker copy MiB':>16} {'build s':>8} {'fingerprint s':>14}")
    summary = {}
    for v in VARIANTS:
        def med(field: str) -> float:
            return statistics.median(x[field] for x in runs[v])

        def spread(field: str) -> str:
            vals = [x[field] for x in runs[v]]
            return f"{min(vals)}-{max(vals)}"

        beyond = (med("anon_bytes") - (0 if v == "mapped" else text)) / args.n
        summary[v] = {"anon_bytes": med("anon_bytes"), "rss_bytes": med("rss_bytes"), "bytes_per_row_beyond_text":
                      round(beyond, 1), "peak_rss_bytes": med("peak_rss_bytes"), "lookup_100k_s": med("lookup_100k_s"),
                      "lookup_100k_s_range": spread("lookup_100k_s"), "worker_private_bytes": med("worker_private_bytes"),
                      "build_s": med("build_s"), "fingerprint_s": med("fingerprint_s"),
                      "fingerprint_s_range": spread("fingerprint_s")}
        s = summary[v]
        print(f"{v:8} {s['anon_bytes'] / mib:9.1f} {s['rss_bytes'] / mib:8.1f} {beyond:18.1f} "
              f"{s['peak_rss_bytes'] / mib:9.1f} {s['lookup_100k_s']:9.3f} ({s['lookup_100k_s_range']}) "
              f"{s['worker_private_bytes'] / mib:10.1f} {s['build_s']:8.2f} {s['fingerprint_s']:8.3f} "
              f"({s['fingerprint_s_range']})")
    res["summary"] = summary
    if len({x["fingerprint"] for v in VARIANTS for x in runs[v]}) != 1:
        raise SystemExit("the three stores gave different fingerprints")
    res["machine"]["load_avg_end"] = load_average()
    print(f"medians of {args.repeats} interleaved runs; load average: start {res['machine']['load_avg_start']}, "
          f"end {res['machine']['load_avg_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
