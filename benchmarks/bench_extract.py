"""Stage-1 speed and the quality of fast banks: teacher extraction A vs B, interleaved in one run.

    python benchmarks/bench_extract.py                                  # fp32 vs bf16, 512 built-in rows, 3 rounds
    python benchmarks/bench_extract.py --variants fp32 bf16 bf16-64px --rounds 5
    python benchmarks/bench_extract.py --variants fp32 fp32-compiled --rows 2048   # torch.compile, cold each round
    python benchmarks/bench_extract.py --variants fp32-text-bf16 fp32-text-bf16-compiled-warm --rows 2048   # compiled once
    python benchmarks/bench_extract.py --teachers                       # forward passes alone, per precision
    python benchmarks/bench_extract.py --teachers --teacher-precisions fp32 --compiled   # and the compiled image teacher
    python benchmarks/bench_extract.py --agreement --rows 4000          # top-1 neighbours: bf16 banks vs fp32
    python benchmarks/bench_extract.py --agreement --agreement-variants fp32-112px fp32-64px --rows 4000
    python benchmarks/bench_extract.py --agreement --data benchmarks/work/openclipart/train.csv --rows 0

Speed (default): `extract_banks` end to end (default teachers, DataLoader
workers, writing a bank) on the first ``--rows`` rows of a data set (default:
the built-in synthetic data, 64 px, made here), each variant once per round in
alternating order (ABBA...), after one warm-up round; medians, quartiles and
the spread in rows/s, each variant's median ratio to the first, and the shares of
each run spent in the image teacher's ``encode``, the text teacher's and the rest.
The teachers are loaded once: load time is not extraction time.

``--teachers``: each teacher's forward pass alone (inputs preprocessed), fp32
and bf16 interleaved, and one process's decode + preprocessing rate.

``--agreement``: a bank of the fp32 reference and of each variant on the
whole data (or ``--rows``), their exact neighbour tables, and the share of rows
whose top-1 neighbour (image side and text side) is the same as the
reference's; also the share where the variant's pick is within the
reference's top 5.

The load average is printed at start and end: a busy machine slows every
variant, so compare ratios, not absolute rates. Results go to
``benchmarks/results/extract_*.json``.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, load_average, machine_facts, print_table, quiet_logging, stats, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from clip_ping.banks import writer as bank_writer  # noqa: E402
from clip_ping.banks import ExtractConfig, extract_banks  # noqa: E402
from clip_ping.data.csv_reader import read_pairs
from clip_ping.data.images import load_image
from clip_ping.teachers import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER, load_image_teacher, load_text_teacher  # noqa: E402

# name -> ExtractConfig settings. "fp32" is extraction as it was before the precision and compile options;
# every variant runs the teachers uncompiled (BASE_SETTINGS) unless it says otherwise, and the text teacher
# in the variant's precision unless it names a text precision ("fp32-text-bf16": the default on a device
# with native bf16).
BASE_SETTINGS: dict[str, Any] = {"compile": "off"}
# variants whose image teacher is changed after loading (not extraction settings)
TEACHER_CHANGES: dict[str, dict[str, bool]] = {
    "fp32-unfolded": {"folded": False},
    "fp32-whole-batch": {"whole_batch": True},
    "issue-fp32": {"folded": False, "whole_batch": True},
}
COMPILED_ONCE = {"fp32-text-bf16-compiled-warm"}  # compiled in the warm-up round only, not in every round
PER_SAMPLE_TRANSFORM = {"fp32-text-bf16-per-sample", "issue-fp32"}  # bank_writer.SPLIT_TRANSFORM off
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "fp32-compiled": {"precision": "fp32", "compile": "on"},
    "fp32-unfolded": {"precision": "fp32"},  # the image teacher's batch norms not folded into its convolutions
    "fp32-whole-batch": {"precision": "fp32"},  # the image teacher's forward on the whole batch, not cache-sized calls
    "issue-fp32": {"precision": "fp32"},  # extraction as issue 15 found it: unfolded, whole batches, text in fp32
    "fp32-text-bf16": {"precision": "fp32", "text_precision": "bf16"},
    "fp32-text-bf16-compiled": {"precision": "fp32", "text_precision": "bf16", "compile": "on"},
    # compiled once, in the warm-up round, then reused: the rate of a large extraction after its compile
    "fp32-text-bf16-compiled-warm": {"precision": "fp32", "text_precision": "bf16", "compile": "on"},
    # the teacher's whole transform per sample in the loader workers (float tensors), not split at the batch
    "fp32-text-bf16-per-sample": {"precision": "fp32", "text_precision": "bf16"},
    "bf16": {"precision": "bf16"},
    "bf16-w0": {"precision": "bf16", "workers": 0},
    "bf16-w1": {"precision": "bf16", "workers": 1},
    "bf16-1thread": {"precision": "bf16", "threads": 1},
    "bf16-112px": {"precision": "bf16", "teacher_image_size": 112},
    "bf16-64px": {"precision": "bf16", "teacher_image_size": 64},
    "fp32-w0": {"precision": "fp32", "workers": 0},
    "fp32-w1": {"precision": "fp32", "workers": 1},
    "fp32-160px": {"precision": "fp32", "teacher_image_size": 160},
    "fp32-112px": {"precision": "fp32", "teacher_image_size": 112},
    "fp32-64px": {"precision": "fp32", "teacher_image_size": 64},
}


def make_data(root: Path, data: str | None, rows: int) -> Path:
    """A CSV of the first ``rows`` rows (0: all) of ``data``, or of a new built-in data set, with absolute paths."""
    if data is None:
        from clip_ping.data.synth import SynthConfig, generate_synthetic

        synth = root / "synth"
        n = rows or 4000
        generate_synthetic(SynthConfig(out=str(synth), seed=0, n_train=n, n_val=2, n_test=2, workers=1), progress=False)
        source = synth / "train.csv"
    else:
        source = Path(data)
    table = read_pairs(source)
    n = len(table) if rows <= 0 else min(rows, len(table))
    out = root / f"rows_{n}.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filepath", "caption"])
        for i in range(n):
            writer.writerow([str(Path(table.filepaths[i]).resolve()), table.captions[i]])
    return out


class Teachers:
    """The default teachers, loaded once (load time is not extraction time). A variant that compiles the image
    teacher gets a fresh one each time and a new, empty inductor cache, so every round pays the compile a
    first extraction on a new machine pays."""

    def __init__(self, root: Path) -> None:
        self.root, self.made = root, 0
        self.image, self.text = load_image_teacher(DEFAULT_IMAGE_TEACHER), load_text_teacher(DEFAULT_TEXT_TEACHER)
        self.changed: dict[str, Any] = {}  # variant -> its image teacher changed as TEACHER_CHANGES says
        self.compiled_once: dict[str, Any] = {}  # COMPILED_ONCE variant -> its teacher, compiled in its first round

    def for_variant(self, name: str) -> tuple[Any, Any]:
        changes = TEACHER_CHANGES.get(name)
        if changes:
            if name not in self.changed:
                teacher = load_image_teacher(DEFAULT_IMAGE_TEACHER)
                if not changes.get("folded", True):
                    teacher.model = teacher.model_as_loaded
                if changes.get("whole_batch"):
                    teacher.cpu_pixels_per_call = 0
                self.changed[name] = teacher
            return self.changed[name], self.text
        if settings_of(name).get("compile") == "off":
            return self.image, self.text
        if name in self.compiled_once:
            return self.compiled_once[name], self.text
        self.made += 1
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.root / f"inductor_cache_{self.made}")
        torch._dynamo.reset()
        teacher = load_image_teacher(DEFAULT_IMAGE_TEACHER)
        if name in COMPILED_ONCE:
            self.compiled_once[name] = teacher  # extract_banks compiles it on its first use; later rounds reuse that
        return teacher, self.text


def settings_of(name: str) -> dict[str, Any]:
    settings = {**BASE_SETTINGS, **VARIANTS[name]}
    settings.setdefault("text_precision", settings.get("precision", "fp32"))
    return settings


class EncodeTimer:
    """Seconds spent inside a teacher's ``encode`` (wrapped on the instance), to split a run's wall time."""

    def __init__(self, teacher: Any) -> None:
        self.seconds, encode = 0.0, teacher.encode

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return encode(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        teacher.encode = timed


def timer_of(teacher: Any, timers: dict[int, EncodeTimer]) -> EncodeTimer:
    if id(teacher) not in timers:
        timers[id(teacher)] = EncodeTimer(teacher)
    return timers[id(teacher)]


def bench_speed(csv_path: Path, root: Path, names: list[str], rounds: int, base: dict[str, Any]) -> dict[str, Any]:
    teachers = Teachers(root)
    n_rows = len(read_pairs(csv_path))
    timers: dict[int, EncodeTimer] = {}
    parts: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}  # (wall, image, text) a round

    def run(name: str):
        def go(round_: int) -> None:
            out = root / f"bank_{name}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = ExtractConfig(data=str(csv_path), out=str(out), progress=False, **{**base, **settings_of(name)})
            image_teacher, text_teacher = teachers.for_variant(name)
            image_timer, text_timer = timer_of(image_teacher, timers), timer_of(text_teacher, timers)
            image0, text0, t0 = image_timer.seconds, text_timer.seconds, time.perf_counter()
            bank_writer.SPLIT_TRANSFORM = name not in PER_SAMPLE_TRANSFORM
            try:
                extract_banks(cfg, image_teacher=image_teacher, text_teacher=text_teacher)
            finally:
                bank_writer.SPLIT_TRANSFORM = True
            if round_ >= 1:  # after the warm-up round, as interleaved() keeps
                parts[name].append((time.perf_counter() - t0, image_timer.seconds - image0, text_timer.seconds - text0))
            shutil.rmtree(out, ignore_errors=True)
        return go

    seconds = interleaved({name: run(name) for name in names}, repeats=rounds, warmup=1)
    result: dict[str, Any] = {"rows": n_rows, "rounds": rounds, "settings": base, "variants": {}}
    first = statistics_of(seconds[names[0]], n_rows)
    table = []
    for name in names:
        s = statistics_of(seconds[name], n_rows)
        ratios = [a / b for a, b in zip(seconds[names[0]], seconds[name])]  # per round: paired
        s["speedup_vs_first_per_round"] = [round(r, 2) for r in ratios]
        s["speedup_vs_first_median"] = round(float(np.median(ratios)), 2)
        # where a run's time goes: inside the image teacher's encode, the text teacher's, and the rest (loader
        # waits, normalising the batch, writing the bank), as shares of the run, median over rounds
        shares = {key: float(np.median([p[i] / p[0] for p in parts[name]]))
                  for i, key in ((1, "image_encode"), (2, "text_encode"))}
        shares["rest"] = 1.0 - shares["image_encode"] - shares["text_encode"]
        s["time_shares_median"] = {k: round(v, 3) for k, v in shares.items()}
        s["encode_seconds"] = [[round(x, 2) for x in p] for p in parts[name]]  # (wall, image, text) a round
        result["variants"][name] = {"settings": settings_of(name), "seconds": [round(x, 2) for x in seconds[name]], **s}
        table.append([name, s["rows_per_s_median"], f"{s['rows_per_s_min']:.1f}-{s['rows_per_s_max']:.1f}",
                      s["speedup_vs_first_median"], " ".join(f"{r:.2f}" for r in ratios),
                      " / ".join(f"{100 * shares[k]:.0f}" for k in ("image_encode", "text_encode", "rest"))])
    print_table(table, ["variant", "rows/s median", "rows/s min-max", f"x {names[0]} (median)", "x per round",
                        "% image / text / rest"],
                title=f"extract_banks end to end, {n_rows} rows, {rounds} rounds interleaved "
                      f"(first: {first['rows_per_s_median']:.1f} rows/s)")
    return result


def statistics_of(seconds: list[float], rows: int) -> dict[str, Any]:
    s = stats(seconds)
    return {"seconds_median": round(s["median"], 2), "seconds_q1": round(s["q1"], 2), "seconds_q3": round(s["q3"], 2),
            "rows_per_s_median": round(rows / s["median"], 1), "rows_per_s_min": round(rows / s["max"], 1),
            "rows_per_s_max": round(rows / s["min"], 1)}


def bench_teachers(csv_path: Path, root: Path, rounds: int, batch_size: int, precisions: list[str],
                   compiled: bool) -> dict[str, Any]:
    """Each teacher's forward alone per precision; with ``compiled`` also the image teacher compiled (its
    first call, in this process with an empty inductor cache, timed apart: that is the compile)."""
    if "fp32" not in precisions:
        raise SystemExit("--teacher-precisions must include fp32 (the reference of the ratios)")
    teachers = Teachers(root)
    image_teacher, text_teacher = teachers.image, teachers.text
    table = read_pairs(csv_path)
    n = min(len(table), 2 * batch_size)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    t0 = time.perf_counter()
    images = torch.stack([image_teacher.transform(load_image(table.filepaths[i])) for i in range(n)])
    decode = n / (time.perf_counter() - t0)
    torch.set_num_threads(before)
    captions = table.captions[: 4 * batch_size]

    def forward(teacher: Any, precision: str, inputs: Any):
        def go(round_: int) -> None:
            teacher.precision = precision
            for b in range(0, len(inputs), batch_size):
                teacher.encode(inputs[b : b + batch_size])
            teacher.precision = "fp32"
        return go

    fns = {f"{kind} {p}": forward(t, p, x) for kind, t, x in (("image", image_teacher, images), ("text", text_teacher, captions))
           for p in precisions}
    first_call_s = None
    if compiled:
        fast, _ = teachers.for_variant("fp32-compiled")
        fast.compile(batch_size)
        t0 = time.perf_counter()
        fast.encode(images[:batch_size])
        first_call_s = round(time.perf_counter() - t0, 1)
        print(f"image teacher compiled: first call (the compile, empty cache) {first_call_s} s", flush=True)
        fns["image fp32 compiled"] = forward(fast, "fp32", images)
    seconds = interleaved(fns, repeats=rounds, warmup=1)
    counts = {"image": len(images), "text": len(captions)}
    result: dict[str, Any] = {"decode_transform_images_per_s_1thread": round(decode, 1),
                              "input": list(images.shape[1:]), "batch_size": batch_size,
                              "compiled_first_call_s": first_call_s, "forward": {}}
    rows = []
    for name, secs in seconds.items():
        kind = name.split()[0]
        rates = [counts[kind] / s for s in secs]
        fp32 = [counts[kind] / s for s in seconds[f"{kind} fp32"]]
        result["forward"][name] = {"per_s_median": round(float(np.median(rates)), 1),
                                   "per_s_min": round(min(rates), 1), "per_s_max": round(max(rates), 1),
                                   "x_fp32_median": round(float(np.median([r / f for r, f in zip(rates, fp32)])), 2)}
        rows.append([name, *result["forward"][name].values()])
    print(f"decode + preprocessing, 1 thread: {decode:.1f} images/s at {list(images.shape[1:])}")
    print_table(rows, ["teacher forward", "per s median", "min", "max", "x fp32"],
                title=f"teacher forward passes, batch {batch_size}, {torch.get_num_threads()} threads, {rounds} rounds interleaved")
    return result


def bench_agreement(csv_path: Path, root: Path, base: dict[str, Any], others: list[str]) -> dict[str, Any]:
    from clip_ping.knn import NeighborsConfig, build_neighbors, load_neighbors

    teachers = Teachers(root)
    tables, seconds = {}, {}
    for name in ("fp32", *others):
        out = root / f"agree_{name}"
        t0 = time.perf_counter()
        image_teacher, text_teacher = teachers.for_variant(name)
        extract_banks(ExtractConfig(data=str(csv_path), out=str(out), progress=False, **{**base, **settings_of(name)}),
                      image_teacher=image_teacher, text_teacher=text_teacher)
        seconds[name] = round(time.perf_counter() - t0, 1)
        build_neighbors(NeighborsConfig(banks=str(out), k=5, method="exact", progress=False))
        tables[name] = load_neighbors(out)
    result: dict[str, Any] = {"rows": len(tables["fp32"].image), "reference": "fp32", "extract_seconds": seconds,
                              "agreement": {}}
    for other in others:
        same = {side: bool(np.array_equal(np.load(root / "agree_fp32" / f"{side}.npy"),
                                          np.load(root / f"agree_{other}" / f"{side}.npy"))) for side in ("image", "text")}
        result.setdefault("bank_identical", {})[other] = same
        print(f"{other} vs fp32, bank bytes identical: image {same['image']}, text {same['text']}")
        result["agreement"][other] = {}
        for side in ("image", "text"):
            a, b = np.asarray(getattr(tables["fp32"], side)), np.asarray(getattr(tables[other], side))
            top1 = float((a[:, 0] == b[:, 0]).mean())
            in_top5 = float((a == b[:, :1]).any(axis=1).mean())
            result["agreement"][other][side] = {"top1_same": round(top1, 5), "top1_in_fp32_top5": round(in_top5, 5)}
            print(f"{other} vs fp32, {side}-side neighbours, {result['rows']} rows: the same top-1 {100 * top1:.2f} %; "
                  f"{other}'s top-1 within fp32's top 5: {100 * in_top5:.2f} %")
    return result


def check_variants(names: list[str]) -> None:
    """Refuse a compiled-once variant beside a cold-compiled one: each cold compile resets torch.compile's
    caches, the warm teacher's too, so the warm one would compile again and its rate mean nothing."""
    cold = [v for v in names if settings_of(v).get("compile") == "on" and v not in COMPILED_ONCE]
    if cold and COMPILED_ONCE & set(names):
        raise SystemExit(f"{', '.join(sorted(COMPILED_ONCE))} cannot run beside {', '.join(cold)}: "
                         "each cold compile resets torch.compile's caches, the warm teacher's too")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="pairs CSV/TSV to read (default: the built-in data, made here)")
    parser.add_argument("--rows", type=int, default=512, help="first rows of the data used (0: all)")
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16"], choices=sorted(VARIANTS),
                        help="extraction settings compared; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (unless a variant sets them)")
    parser.add_argument("--teachers", action="store_true", help="measure the forward passes alone instead")
    parser.add_argument("--teacher-precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="--teachers: the precisions of the forward passes")
    parser.add_argument("--compiled", action="store_true", help="--teachers: also the image teacher compiled")
    parser.add_argument("--agreement", action="store_true", help="measure top-1 neighbour agreement instead")
    parser.add_argument("--agreement-variants", nargs="+", default=["bf16"], choices=sorted(VARIANTS),
                        help="the banks compared with fp32's by --agreement")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()
    quiet_logging()

    facts = machine_facts()
    print(f"machine: {facts['cpu']}, {facts['cpu_count']} cores, torch {facts['torch']}, "
          f"{facts['torch_threads']} threads; load average at start {facts['load_avg_start']}", flush=True)
    base = {"batch_size": args.batch_size, "workers": args.workers}
    check_variants(args.variants)
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        root = Path(tmp)
        csv_path = make_data(root, args.data, args.rows)
        source = args.data or "built-in synthetic data (64 px)"
        if args.teachers:
            kind, result = "teachers", bench_teachers(csv_path, root, args.rounds, args.batch_size,
                                                      args.teacher_precisions, args.compiled)
        elif args.agreement:
            kind, result = "agreement", bench_agreement(csv_path, root, base, args.agreement_variants)
        else:
            kind, result = "speed", bench_speed(csv_path, root, args.variants, args.rounds, base)
    result = {"command": " ".join(sys.argv), "data": source, "machine": facts, **result}
    print(f"load average at the end: {load_average()}")
    path = write_json(f"extract_{kind}{'_' + args.tag if args.tag else ''}", result)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
