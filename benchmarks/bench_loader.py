"""Loader throughput (samples/s): CSV vs WebDataset shards, against the student's compute speed.

    .venv/bin/python benchmarks/bench_loader.py --quick     # smoke run
    .venv/bin/python benchmarks/bench_loader.py             # 2,000 synthetic pairs, batch 128

Each reader yields what training consumes: the student's train transform
(``preprocess_train`` of `create_student`) applied to the decoded image and the
caption tokenised per batch, batched by `collate_pairs` (as the trainer does):

* ``csv``: `PairDataset` over the `PairTable` of ``train.csv``, wrapped as the
  trainer does (`SeededAugmentation`, `EpochBatchSampler`), DataLoader workers 0/1/2;
* ``csv-cached``: the same, with the decoded images in memory (`DecodedImages`,
  filled once before the passes; its fill time is reported beside them);
* ``csv-cached-split``: the cached table as the trainer reads it now: the crop per
  sample, ToTensor + Normalize once per batch (`split_at_batch`), the captions
  tokenized once (`tokenize_captions`);
* ``shards-random``: the same `PairDataset` over a `ShardTable` (random access by
  byte offset into the tars), same sampler;
* ``shards-stream``: `ShardStream` (webdataset, tars read sequentially, split
  over the workers), DataLoader batch_size B.

The shards are written once by `clip_ping.data.convert.convert` into
``benchmarks/work/``. Every configuration is timed over one pass of
``--batches`` batches, configurations alternated over ``--repeats`` rounds;
reported: samples/s after the first batch (steady) and including it (with the
worker start-up). Against it: the compute-only training throughput of the
student (`Trainer.train_step` on pre-loaded batches, plain CLIP and CLIP-PING)
in the same process. A loader that delivers fewer samples/s than the student
consumes is the bottleneck. Note that in a real run the loader workers and the
training process share the cores; `bench_train.py` measures that end to end.
Results: ``benchmarks/results/loader.json``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from clip_ping.data.csv_reader import read_pairs  # noqa: E402
from clip_ping.data.image_cache import GIB, DecodedImages  # noqa: E402
from clip_ping.data.batch_transform import split_at_batch  # noqa: E402
from clip_ping.data.pairs import PairDataset, collate_pairs, tokenize_captions  # noqa: E402
from clip_ping.data.convert import ConvertConfig, convert  # noqa: E402
from clip_ping.data.shards import open_shards  # noqa: E402
from clip_ping.data.stream import ShardStream  # noqa: E402
from clip_ping.model.student import create_student  # noqa: E402
from clip_ping.data.order import EpochBatchSampler, SeededAugmentation  # noqa: E402
from clip_ping.training.trainer import Trainer  # noqa: E402


def make_shards(data: Path, samples_per_shard: int) -> Path:
    out = C.WORK / f"{data.name}-shards-{samples_per_shard}"
    descriptor = out / "train.shards.json"
    if descriptor.is_file():
        try:
            open_shards(descriptor)
            return descriptor
        except Exception:
            pass
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    convert(ConvertConfig(src=str(data), out=str(out), to="shards", split="train", samples_per_shard=samples_per_shard))
    print(f"[data] converted {data.name} to shards in {time.perf_counter() - t0:.1f} s: {out}", flush=True)
    return descriptor


READERS = ("csv", "csv-cached", "csv-cached-split", "shards-random", "shards-stream")


def loaders(data: Path, descriptor: Path | None, model: str, batch: int, workers: list[int],
            readers: list[str]) -> tuple[dict[str, Callable[[int], DataLoader]], dict[str, float]]:
    """name -> (epoch -> DataLoader) for every reader and worker count; and the image cache's fill time."""
    _, preprocess_train, _, tokenizer = create_student(model, seed=0)
    csv_table = read_pairs(data / "train.csv")
    shard_table = open_shards(descriptor) if descriptor is not None else None
    collate = partial(collate_pairs, tokenizer=tokenizer)
    out: dict[str, Callable[[int], DataLoader]] = {}
    setup: dict[str, float] = {}
    cached = DecodedImages(csv_table)
    # the trainer's loader on a cached data set: the crop per sample, ToTensor + Normalize per batch, tokens made once
    sample_transform, finish_images = split_at_batch(preprocess_train)
    tokens = tokenize_captions(csv_table.captions, tokenizer) if "csv-cached-split" in readers else None
    if {"csv-cached", "csv-cached-split"} & set(readers):
        t0 = time.perf_counter()
        cached.fill(workers=max(workers))
        setup = {"image_cache_fill_s": time.perf_counter() - t0, "image_cache_gib": cached.nbytes / GIB}

    def mapped(table, split: bool = False):
        def make(w: int, epoch: int) -> DataLoader:
            if split:
                ds = SeededAugmentation(PairDataset(table, sample_transform, caption_tokens=tokens), 0, epoch)
                collate_fn = partial(collate_pairs, tokenizer=tokenizer, finish_images=finish_images)
            else:
                ds, collate_fn = SeededAugmentation(PairDataset(table, preprocess_train), 0, epoch), collate
            return DataLoader(ds, batch_sampler=EpochBatchSampler(len(table), batch, 0, epoch), num_workers=w,
                              collate_fn=collate_fn)
        return make

    def stream(w: int, epoch: int) -> DataLoader:
        ds = ShardStream(shard_table, preprocess_train)
        ds.set_epoch(epoch)
        return DataLoader(ds, batch_size=batch, num_workers=w, collate_fn=collate)

    for w in workers:
        makers = {"csv": partial(mapped(csv_table), w), "csv-cached": partial(mapped(cached), w),
                  "csv-cached-split": partial(mapped(cached, split=True), w),
                  "shards-random": partial(mapped(shard_table), w), "shards-stream": partial(stream, w)}
        out.update({f"{name} w={w}": makers[name] for name in readers})
    return out, setup


def time_pass(make: Callable[[int], DataLoader], epoch: int, n_batches: int) -> dict[str, float]:
    t0 = time.perf_counter()
    t_first = None
    samples = samples_after_first = 0
    for b, batch in enumerate(make(epoch)):
        n = len(batch["index"])
        samples += n
        if t_first is None:
            t_first = time.perf_counter()
        else:
            samples_after_first += n
        if b + 1 >= n_batches:
            break
    t_end = time.perf_counter()
    return {"samples": samples, "seconds": t_end - t0, "first_batch_s": (t_first or t_end) - t0,
            "steady_samples": samples_after_first, "steady_seconds": t_end - (t_first or t_end)}


def student_compute(data: Path, model: str, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    from bench_train import preload_batches, train_config

    methods = ("clip", "clip-ping") if (data / "banks").is_dir() else ("clip",)
    trainers = {m: Trainer(train_config(data, C.WORK / "runs" / f"loader-{m}", m, model, batch, "fp32", 0, 10**6))
                for m in methods}
    batches = preload_batches(trainers["clip"], min(warmup + steps, 4))
    times = C.interleaved({m: (lambda r, t=t: t.train_step(batches[r % len(batches)])) for m, t in trainers.items()},
                          repeats=steps, warmup=warmup)
    return {m: {"step_s_median": statistics.median(v), "samples_per_s": batch / statistics.median(v)}
            for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (256 pairs, batch 32, 1 round)")
    ap.add_argument("--n-train", type=int, default=2000, help="synthetic training pairs (default 2000)")
    ap.add_argument("--model", default="ViT-XXS-8-64", help="student whose transform and compute are used")
    ap.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    ap.add_argument("--batches", type=int, default=15, help="batches per timed pass (default 15 = an epoch of 2,000)")
    ap.add_argument("--repeats", type=int, default=2, help="passes per configuration, alternated (default 2)")
    ap.add_argument("--workers", default="0,1,2", help="comma list of DataLoader worker counts (default 0,1,2)")
    ap.add_argument("--samples-per-shard", type=int, default=500, help="samples per tar shard (default 500)")
    ap.add_argument("--compute-steps", type=int, default=8, help="measured student steps per method (default 8)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of this process (default 0: torch's default)")
    ap.add_argument("--readers", default=",".join(READERS), help=f"comma list of {', '.join(READERS)} (default all)")
    ap.add_argument("--data", default=None, help="a data set folder with train.csv (default: the built-in data, "
                                                  "--n-train pairs)")
    ap.add_argument("--out", default=None, help="results JSON name (default loader / loader_quick)")
    args = ap.parse_args()
    C.quiet_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n_train, args.batch_size, args.batches, args.repeats, args.compute_steps = 256, 32, 4, 1, 2
        args.samples_per_shard = 100
    workers = [int(w) for w in args.workers.split(",") if w != ""]
    result: dict[str, Any] = {"machine": C.machine_facts(), "args": vars(args)}
    print(f"load average at start: {result['machine']['load_avg_start']}  (torch threads {torch.get_num_threads()})")

    readers = [r for r in args.readers.split(",") if r]
    if set(readers) - set(READERS):
        raise SystemExit(f"unknown reader(s) {', '.join(sorted(set(readers) - set(READERS)))}; known: {', '.join(READERS)}")
    data = Path(args.data).resolve() if args.data else C.prepare_data(args.n_train)
    descriptor = make_shards(data, args.samples_per_shard) if any(r.startswith("shards") for r in readers) else None
    makers, setup = loaders(data, descriptor, args.model, args.batch_size, workers, readers)
    result["setup"] = setup
    if setup:
        print(f"image cache filled in {setup['image_cache_fill_s']:.1f} s ({setup['image_cache_gib']:.3f} GiB)")
    n_batches = min(args.batches, len(read_pairs(data / "train.csv")) // args.batch_size)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in makers}
    names = list(makers)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            runs[name].append(time_pass(makers[name], r, n_batches))
            print(f"  {name}: {runs[name][-1]['samples'] / runs[name][-1]['seconds']:.0f} samples/s", flush=True)

    loader_res = {}
    for name, rs in runs.items():
        steady = [x["steady_samples"] / x["steady_seconds"] for x in rs if x["steady_seconds"] > 0]
        total = [x["samples"] / x["seconds"] for x in rs]
        loader_res[name] = {"samples_per_s_steady": statistics.median(steady) if steady else float("nan"),
                            "samples_per_s_with_startup": statistics.median(total),
                            "first_batch_s": statistics.median(x["first_batch_s"] for x in rs), "passes": rs}
    result["loader"] = loader_res

    print(f"[compute] {args.model} Trainer.train_step, batch {args.batch_size}, fp32", flush=True)
    compute = student_compute(data, args.model, args.batch_size, args.compute_steps, 1)
    result["student_compute"] = compute
    need = max(c["samples_per_s"] for c in compute.values())
    rows = []
    for name, res in loader_res.items():
        rows.append([name, res["samples_per_s_steady"], res["samples_per_s_with_startup"], res["first_batch_s"],
                     res["samples_per_s_steady"] / need,
                     "loader-bound" if res["samples_per_s_steady"] < need else "ok"])
    C.print_table(rows, ["reader", "sps steady", "sps w/ startup", "1st batch s", "x student", "verdict"],
                  f"loader throughput, batch {args.batch_size}, {args.model} train transform + tokenizer")
    C.print_table([[m, c["samples_per_s"], c["step_s_median"]] for m, c in compute.items()],
                  ["student (compute only)", "samples/s", "step s"])
    result["student_samples_per_s_max"] = need
    path = C.write_json(args.out or ("loader_quick" if args.quick else "loader"), result)
    print(f"\nload average at end: {result['machine']['load_avg_end']}\nwrote {path}")


if __name__ == "__main__":
    main()
