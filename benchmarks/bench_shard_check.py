"""What the stale-shard check costs when a split of tar shards is opened (`shard_index.check_shard`).

Writes ``--shards`` tars of ``--per-shard`` samples (a ``.jpg`` of ``--image-bytes`` random
bytes and a ``.txt`` caption each, as img2dataset writes them), indexes them, then times:

- ``stat of every shard``: the check itself on every open when no shard changed;
- ``open (stat only)``: all of `open_shards` then (the descriptor read, the index memory-mapped);
- ``open (all re-read)``: the same after every shard's modification time changed (``touch``,
  or a copy without ``-p``): each shard's member table is read from its headers and compared;
- ``member table, per shard`` and ``per 1,000 members``: one shard's headers read alone.

The page cache is warm (the shards were just written): a cold network file system reads each
header block from its device and costs more; the stat-only open does not read the tars at all.
Times are medians of ``--repeats``, interleaved.

    .venv/bin/python benchmarks/bench_shard_check.py --shards 40 --per-shard 2500
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import write_json  # noqa: E402

from clip_ping.data.shard_index import member_table_digest  # noqa: E402
from clip_ping.data.shards import index_shards, open_shards  # noqa: E402


def write_tars(folder: Path, shards: int, per_shard: int, image_bytes: int) -> list[Path]:
    paths = []
    payload = os.urandom(image_bytes)
    for j in range(shards):
        path = folder / f"train-{j:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{j:05d}{i:05d}"
                for ext, data in (("jpg", payload), ("txt", f"a caption of sample {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_timed(fn) -> float:
    """CPU seconds of this process: on a shared machine the wall time also counts other processes' turns."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--per-shard", type=int, default=2500)
    ap.add_argument("--image-bytes", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-shard-check-") as tmp:
        folder = Path(tmp)
        paths = write_tars(folder, args.shards, args.per_shard, args.image_bytes)
        descriptor = folder / "train.shards.json"
        t_index = timed(lambda: index_shards(paths, descriptor))
        indexed = {p: p.stat().st_mtime_ns for p in paths}
        stats, stat_only, reread, one_shard, one_shard_cpu = [], [], [], [], []
        for _ in range(args.repeats):
            for p, mtime in indexed.items():  # as indexed
                os.utime(p, ns=(mtime, mtime))
            stats.append(timed(lambda: [p.stat() for p in paths]))
            stat_only.append(timed(lambda: open_shards(descriptor)))
            for p, mtime in indexed.items():  # a new modification time, the same bytes
                os.utime(p, ns=(mtime, mtime + 1_000_000))
            reread.append(timed(lambda: open_shards(descriptor)))
            one_shard.append(timed(lambda: member_table_digest(paths[0])))
            one_shard_cpu.append(cpu_timed(lambda: member_table_digest(paths[0])))
    members = 2 * args.per_shard
    result = {
        "shards": args.shards, "samples_per_shard": args.per_shard, "members_per_shard": members,
        "rows": args.shards * args.per_shard, "index_s": round(t_index, 3),
        "stat_of_every_shard_s": round(statistics.median(stats), 5),
        "open_stat_only_s": round(statistics.median(stat_only), 4),
        "open_all_reread_s": round(statistics.median(reread), 3),
        "member_table_per_shard_s": round(statistics.median(one_shard), 4),
        "member_table_per_1000_members_ms": round(1000 * statistics.median(one_shard) / members * 1000, 3),
        "member_table_cpu_per_1000_members_ms": round(1000 * statistics.median(one_shard_cpu) / members * 1000, 3),
    }
    per_member = statistics.median(one_shard_cpu) / members
    # a split of 12M rows (CC12M) in 1,200 shards of 10,000 samples, 2 members each
    # (CPU only, the header blocks in the page cache; a cold disk adds one 512-byte read a member)
    result["extrapolated_12M_rows_1200_shards_all_reread_cpu_s"] = round(per_member * 24_000_000, 1)
    path = write_json("shard_check", result)
    for key, value in result.items():
        if key != "machine":
            print(f"{key:52s} {value}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
