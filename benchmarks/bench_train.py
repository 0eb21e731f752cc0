"""Training throughput: plain CLIP vs CLIP-PING, and clip-ping vs open_clip_train.

    .venv/bin/python benchmarks/bench_train.py --quick           # smoke run (~1-2 min)
    .venv/bin/python benchmarks/bench_train.py                   # ViT-XXS-8-64 (+ ViT-XS-16 unless --no-xs)
    .venv/bin/python benchmarks/bench_train.py --vs-open-clip    # clip-ping plain CLIP vs open_clip_train
    .venv/bin/python benchmarks/bench_train.py --methods         # step time of every method vs CLIP-PING
    .venv/bin/python benchmarks/bench_train.py --image-cache     # Trainer.fit with decoded images in memory or not
    .venv/bin/python benchmarks/bench_train.py --attention-blocks  # open_clip's custom attention block vs default

Default mode, per model and precision (fp32, bf16), in one process:

* compute only: a plain-CLIP and a CLIP-PING `Trainer` (same seed, same student
  init) run `Trainer.train_step` on the same batches, loaded beforehand, one step
  of each in turn (ABAB..., warm-up steps discarded); median step time ->
  samples/s and the CLIP-PING / CLIP step-time ratio (target <= 1.05);
* a breakdown of CLIP-PING's extra work (neighbour pick, bank gather from the
  memory maps, heads and the four extra InfoNCE terms forward+backward, the
  optimiser's extra parameters), each timed alone, interleaved;
  ``--profile`` adds torch.profiler tables of one step of each;
* end to end: `Trainer.fit` for N steps (DataLoader with ``--workers``), both
  methods alternately; the step time is the interval between consecutive step
  ends (so it includes waiting for data); the median after warm-up is reported.

``--vs-open-clip``: each side in its own process, alternately (A B A B ...):
clip-ping `Trainer.fit` (method clip) and `open_clip_train.main.main` (through a
wrapper that only registers clip-ping's model configs), on the same model, CSV
(an absolute-path copy for open_clip_train), batch size, workers, precision
(bf16 = open_clip's ``amp_bf16``: autocast, fp32 weights, as clip-ping),
optimiser settings (AdamW lr/betas/eps/wd, warm-up, grad clip 1.0) and number
of steps (whole epochs, since open_clip_train counts epochs). Step time is the
interval between consecutive step ends on both sides (open_clip_train's
``Batch (t)`` per-step value, parsed from its log with ``--log-every-n-steps 1``;
for clip-ping a timestamp after each `train_step`), medians after warm-up.

``--methods``: compute only, one `Trainer` per method setting of `METHOD_SETTINGS`
(A-CLIP-PING's two readings, the other readings of CLIP-PING, the peers),
each on batches from its own loader (so A-CLIP-PING's batches carry the
neighbours' views and SLIP's its extra views, prepared by the loader workers as
in training), one step of each in turn per round; the median step time and the
paired per-round ratio to CLIP-PING and to CLIP. The loader work itself
(A-CLIP-PING decodes two neighbour images per row) is not in these step times.

``--image-cache``: plain-CLIP `Trainer.fit` with ``image_cache`` off and on, each in
a fresh process, alternated (off on, on off, ...); the median step after warm-up
per side and round, and each fit's wall time, which on the cached side includes
decoding every image once. ``--data DIR`` measures on another data set folder.

``--attention-blocks``: CLIP-PING `Trainer.train_step` on the shipped ViT-XXS-8-64 config
(open_clip's custom attention block) and on the same config with open_clip's default
block (``nn.MultiheadAttention``), same batches, one step of each in turn; ``--threads``
sets the torch threads (the demo trains with 1 per process).

Data: the built-in synthetic set (`clip_ping.data.synth`), banks from the default
teachers, neighbours k=10; made once into ``benchmarks/work/``. Results:
``benchmarks/results/train.json`` / ``train_vs_open_clip.json``.

The script is over 450 lines because its five modes share one data preparation, one
interleaved timer and one results file; each mode is one function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402

from clip_ping.model.losses import info_nce  # noqa: E402
from clip_ping.training.trainer import TrainConfig, Trainer  # noqa: E402

TARGET_RATIO = 1.05
PRECISIONS = ("fp32", "bf16")
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}


# --------------------------------------------------------------------------- helpers


class TimedTrainer(Trainer):
    """A Trainer that records a timestamp after every step (for end-to-end step intervals)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.step_ends: list[float] = []
        self.t_fit_start = 0.0

    def fit(self) -> dict[str, Any]:
        self.t_fit_start = time.perf_counter()
        return super().fit()

    def train_step(self, batch):
        result = super().train_step(batch)
        self.step_ends.append(time.perf_counter())
        return result

    def intervals(self) -> list[float]:
        ends = [self.t_fit_start] + self.step_ends
        return [b - a for a, b in zip(ends, ends[1:])]


def train_config(data: Path, out: Path, method: str, model: str, batch: int, precision: str,
                 workers: int, steps: int) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), method=method, model=model, batch_size=batch,
                       precision=precision, workers=workers, steps=steps, warmup_steps=50, lr=1e-3,
                       save_every=10**9, progress=False, tensorboard=False, seed=0)


def sps(batch: int, seconds: float) -> float:
    return batch / seconds if seconds > 0 else float("nan")


def preload_batches(trainer: Trainer, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` batches of epoch 0 (cycled by the caller when more steps are run)."""
    batches = []
    for batch in trainer._loader(0, 0):
        batches.append(batch)
        if len(batches) >= n:
            break
    return batches


# --------------------------------------------------------------------------- compute only


def compute_only(data: Path, model: str, batch: int, precision: str, steps: int, warmup: int,
                 breakdown: bool, profile: bool) -> dict[str, Any]:
    run_root = C.WORK / "runs"
    t0 = time.perf_counter()
    trainers = {m: Trainer(train_config(data, run_root / f"co-{m}", m, model, batch, precision, 2, 10**6))
                for m in ("clip", "clip-ping")}
    batches = preload_batches(trainers["clip"], warmup + steps)
    setup_s = time.perf_counter() - t0
    times = C.interleaved({m: (lambda r, t=t: t.train_step(batches[r % len(batches)])) for m, t in trainers.items()},
                          repeats=steps, warmup=warmup)
    st = {m: C.stats(v) for m, v in times.items()}
    ratio = st["clip-ping"]["median"] / st["clip"]["median"]
    out: dict[str, Any] = {
        "model": model, "precision": precision, "batch_size": batch, "steps": steps, "warmup": warmup,
        "batches_preloaded": len(batches), "setup_s": round(setup_s, 1),
        "step_s": st, "samples_per_s": {m: sps(batch, s["median"]) for m, s in st.items()},
        "ratio_ping_over_clip": ratio,
        # ratio of per-round pairs: robust to slow drifts of the machine's load
        "ratio_paired_median": statistics.median(b / a for a, b in zip(times["clip"], times["clip-ping"])),
    }
    if breakdown or ratio > TARGET_RATIO:
        out["breakdown"] = ping_breakdown(trainers, batches, repeats=max(5, steps))
    if profile:
        out["profile"] = profile_steps(trainers, batches)
    return out


def ping_breakdown(trainers: dict[str, Trainer], batches: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Time each extra piece of a CLIP-PING step alone (interleaved), in seconds (median)."""
    clip, ping = trainers["clip"], trainers["clip-ping"]
    objective = ping.objective
    table, banks, heads = objective.source.table, objective.banks, objective.heads
    prepared = []
    for batch in batches[: min(len(batches), 4)]:
        with torch.no_grad():
            u, v = ping._encode(batch["image"], batch["text"])
        index = batch["index"]
        g = torch.Generator().manual_seed(0)
        p, q = table.pick(index, ping.cfg.neighbor_topk, g)
        a_p, b_p = banks.gather(p)
        a_q, b_q = banks.gather(q)
        prepared.append((index, u, v, p, q, (a_p, b_p, a_q, b_q)))

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(True)

    def pick(r):
        index = prepared[r % len(prepared)][0]
        table.pick(index, ping.cfg.neighbor_topk, torch.Generator().manual_seed(r))

    def gather(r):
        _, _, _, p, q, _ = prepared[r % len(prepared)]
        banks.gather(p)
        banks.gather(q)

    def heads_fwd(r):
        with torch.no_grad():
            heads.targets(*prepared[r % len(prepared)][5])

    def clip_loss_fb(r):
        _, u, v, *_ = prepared[r % len(prepared)]
        info_nce(leaf(u), leaf(v), clip.model.logit_scale.exp()).backward()

    def ping_loss_fb(r):
        _, u, v, _, _, feats = prepared[r % len(prepared)]
        targets = {k: t.float() for k, t in heads.targets(*feats).items()}
        out = objective.criterion(leaf(u), leaf(v), ping.model.logit_scale.exp(), targets=targets)
        out["loss"].backward()

    def optim(trainer):
        def fn(r):
            params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            trainer.optimizer.step()
        return fn

    # make sure every parameter has a gradient (left by the last train_step)
    for t in (clip, ping):
        t.train_step(batches[0])
    times = C.interleaved({"pick": pick, "gather": gather, "heads_fwd": heads_fwd, "clip_loss_fwd_bwd": clip_loss_fb,
                           "ping_loss_fwd_bwd": ping_loss_fb, "optim_clip": optim(clip), "optim_ping": optim(ping)},
                          repeats=repeats, warmup=2)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_guidance = sum(p.numel() for p in heads.parameters())
    n_student = sum(p.numel() for p in ping.model.parameters())
    extra = {
        "neighbour_pick": med["pick"],
        "bank_gather_4_rows_sets": med["gather"],
        "heads_forward": med["heads_fwd"],
        "heads_and_4_extra_infonce_fwd_bwd": med["ping_loss_fwd_bwd"] - med["clip_loss_fwd_bwd"],
        "optimizer_and_clip_extra": med["optim_ping"] - med["optim_clip"],
    }
    extra["sum"] = sum(v for k, v in extra.items() if k != "heads_forward")
    return {"median_s": med, "extra_s": extra, "params": {"student": n_student, "guidance": n_guidance}}


def profile_steps(trainers: dict[str, Trainer], batches: list[dict[str, Any]], steps: int = 3) -> dict[str, str]:
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, trainer in trainers.items():
        trainer.train_step(batches[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                trainer.train_step(batches[i % len(batches)])
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(f"\n[profile] {name}, {steps} steps\n{tables[name]}")
    return tables


# --------------------------------------------------------------------------- end to end


def end_to_end(data: Path, model: str, batch: int, precision: str, steps: int, warmup: int, workers: int,
               rounds: int) -> dict[str, Any]:
    intervals: dict[str, list[float]] = {"clip": [], "clip-ping": []}
    walls: dict[str, list[float]] = {"clip": [], "clip-ping": []}
    for r in range(rounds):
        order = ["clip", "clip-ping"] if r % 2 == 0 else ["clip-ping", "clip"]
        for m in order:
            out = C.WORK / "runs" / f"e2e-{m}-{model}-{precision}"
            shutil.rmtree(out, ignore_errors=True)
            trainer = TimedTrainer(train_config(data, out, m, model, batch, precision, workers, steps))
            trainer.fit()
            iv = trainer.intervals()
            intervals[m] += iv[warmup:]
            walls[m].append(sum(iv))
            del trainer
            shutil.rmtree(out, ignore_errors=True)
    st = {m: C.stats(v) for m, v in intervals.items()}
    return {
        "model": model, "precision": precision, "batch_size": batch, "steps": steps, "warmup": warmup,
        "workers": workers, "rounds": rounds, "step_s": st,
        "samples_per_s": {m: sps(batch, s["median"]) for m, s in st.items()},
        "samples_per_s_mean": {m: sps(batch, s["mean"]) for m, s in st.items()},
        "wall_s_all_steps": walls,
        "ratio_ping_over_clip": st["clip-ping"]["median"] / st["clip"]["median"],
    }


# --------------------------------------------------------------------------- every method vs CLIP-PING

METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "clip": {"method": "clip"},
    "clip-ping": {"method": "clip-ping"},
    "a-clip-ping": {"method": "a-clip-ping"},
    "a-clip-ping-queue": {"method": "a-clip-ping", "neighbor_source": "queue"},
    "a-clip-ping-uncompiled": {"method": "a-clip-ping", "teacher_compile": "off"},  # the online teacher as before
    "clip-compiled": {"method": "clip", "compile": True},  # torch.compile of the student
    "xnn-other": {"method": "clip-ping", "xnn_pairing": "other"},
    "student-table": {"method": "clip-ping", "targets": "student_table"},
    "collisions-positives": {"method": "clip-ping", "collisions": "positives"},
    "declip-nns": {"method": "declip-nns"},
    "slip": {"method": "slip"},
    "relational": {"method": "relational"},
}


def register_block_variant(model: str, block_type: str) -> str:
    """An open_clip config name for ``model`` with another attention block (same widths, depths, names)."""
    import open_clip

    from clip_ping.model.student import MODEL_CONFIG_DIR, register_model_configs

    register_model_configs()
    cfg = json.loads((MODEL_CONFIG_DIR / f"{model}.json").read_text())
    for tower in ("vision_cfg", "text_cfg"):
        cfg[tower]["block_type"] = block_type
    folder = C.WORK / "model_configs"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{model}-{block_type}-block"
    (folder / f"{name}.json").write_text(json.dumps(cfg, indent=4))
    open_clip.add_model_config(folder)
    return name


def attention_blocks(data: Path, model: str, batch: int, precision: str, steps: int, warmup: int,
                     method: str = "clip-ping") -> dict[str, Any]:
    """`Trainer.train_step` of the shipped config (open_clip's custom block) against the same config with
    open_clip's default block (nn.MultiheadAttention), same batches, one step of each in turn."""
    names = {block: register_block_variant(model, block) for block in ("default", "custom")}
    run_root = C.WORK / "runs"
    trainers = {block: Trainer(train_config(data, run_root / f"blocks-{block}", method, name, batch, precision, 0,
                                            10**6))
                for block, name in names.items()}
    batches = preload_batches(trainers["default"], warmup + steps)
    times = C.interleaved({b: (lambda r, t=t: t.train_step(batches[r % len(batches)])) for b, t in trainers.items()},
                          repeats=steps, warmup=warmup)
    st = {b: C.stats(v) for b, v in times.items()}
    return {"model": model, "method": method, "precision": precision, "batch_size": batch, "steps": steps,
            "warmup": warmup, "threads": torch.get_num_threads(), "step_s": st,
            "speedup_custom": st["default"]["median"] / st["custom"]["median"],
            "speedup_paired_median": statistics.median(d / c for d, c in zip(times["default"], times["custom"]))}


def methods_cost(data: Path, model: str, batch: int, precision: str, steps: int, warmup: int,
                 settings: list[str]) -> dict[str, Any]:
    """Median step time of each method setting, interleaved, and its paired ratio to CLIP-PING and CLIP."""
    trainers, batches = {}, {}
    for name in settings:
        cfg = dataclasses.replace(train_config(data, C.WORK / "runs" / f"methods-{name}", "clip", model, batch,
                                               precision, 2, 10**6), **METHOD_SETTINGS[name])
        trainers[name] = Trainer(cfg)
        batches[name] = preload_batches(trainers[name], min(warmup + steps, 6))
    first_step_s = {}  # each setting's first step alone: it holds torch.compile's time where there is one
    for name in settings:
        t0 = time.perf_counter()
        trainers[name].train_step(batches[name][0])
        first_step_s[name] = round(time.perf_counter() - t0, 2)
    times = C.interleaved({n: (lambda r, n=n: trainers[n].train_step(batches[n][r % len(batches[n])]))
                           for n in settings}, repeats=steps, warmup=warmup)
    st = {n: C.stats(v) for n, v in times.items()}

    def paired(n: str, ref: str) -> float | None:
        return statistics.median(b / a for a, b in zip(times[ref], times[n])) if ref in times else None

    return {"model": model, "precision": precision, "batch_size": batch, "steps": steps, "warmup": warmup,
            "step_s": st, "first_step_s": first_step_s,
            "samples_per_s": {n: sps(batch, s["median"]) for n, s in st.items()},
            "ratio_over_clip_ping": {n: paired(n, "clip-ping") for n in settings},
            "ratio_over_clip": {n: paired(n, "clip") for n in settings}}


# --------------------------------------------------------------------------- vs open_clip_train


def _child_clip_ping(spec: dict[str, Any]) -> None:
    """Child process: clip-ping plain-CLIP Trainer.fit; prints the step intervals as JSON."""
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_config(Path(spec["data"]), out, "clip", spec["model"], spec["batch"], spec["precision"],
                       spec["workers"], spec["steps"])
    cfg = dataclasses.replace(cfg, image_cache=spec.get("image_cache", cfg.image_cache))
    trainer = TimedTrainer(cfg)
    trainer.fit()
    shutil.rmtree(out, ignore_errors=True)
    print("CLIPPING_INTERVALS " + json.dumps(trainer.intervals()), flush=True)


def clip_ping_child(spec: dict[str, Any], env: dict[str, str]) -> list[float]:
    """The step intervals of a plain-CLIP `Trainer.fit` run in a fresh process (see `_child_clip_ping`)."""
    spec = {"out": str(C.WORK / "runs" / "vs-clip-ping"), **spec}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child-clip-ping", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    line = next((s for s in proc.stdout.splitlines() if s.startswith("CLIPPING_INTERVALS ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"clip-ping child failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


def _child_open_clip(argv: list[str]) -> None:
    """Child process: register clip-ping's model configs, then run open_clip_train unchanged."""
    import open_clip
    import open_clip_train.main

    from clip_ping.model.student import MODEL_CONFIG_DIR

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    open_clip_train.main.main(argv)


_OC_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?Batch \(t\): [\d.]+, ([\d.]+)/s")


def open_clip_argv(csv_path: Path, logs: Path, name: str, model: str, batch: int, precision: str, workers: int,
                   epochs: int, device: str = "cpu") -> list[str]:
    return [
        "--train-data", str(csv_path), "--dataset-type", "csv", "--csv-separator", ",",
        "--csv-img-key", "filepath", "--csv-caption-key", "caption",
        "--model", model, "--batch-size", str(batch), "--workers", str(workers),
        "--precision", OPEN_CLIP_PRECISION[precision], "--epochs", str(epochs),
        "--lr", "1e-3", "--wd", "0.1", "--warmup", "50", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--grad-clip-norm", "1.0", "--seed", "0", "--device", device,
        "--logs", str(logs), "--name", name, "--report-to", "", "--log-every-n-steps", "1",
        "--save-frequency", "1000000", "--zeroshot-frequency", "0", "--val-frequency", "0",
    ]


def vs_open_clip(data: Path, model: str, batch: int, precision: str, epochs: int, warmup: int, workers: int,
                 rounds: int) -> dict[str, Any]:
    from clip_ping.data.csv_reader import read_pairs

    n = len(read_pairs(data / "train.csv"))
    steps_per_epoch = n // batch
    steps = epochs * steps_per_epoch
    abs_csv = C.absolute_csv(data / "train.csv", C.WORK / f"{data.name}-train-abs.csv")
    logs = C.WORK / "open_clip_logs"
    me = str(Path(__file__).resolve())
    per: dict[str, list[float]] = {"clip-ping": [], "open_clip_train": []}
    round_medians: dict[str, list[float]] = {"clip-ping": [], "open_clip_train": []}
    walls: dict[str, list[float]] = {"clip-ping": [], "open_clip_train": []}
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    oc_env = dict(env)
    try:
        import pandas  # noqa: F401  open_clip_train's CSV reader needs it; clip-ping does not
    except ImportError:
        deps = C.WORK / "pydeps"  # `pip install --no-deps --target benchmarks/work/pydeps pandas`
        if not (deps / "pandas").is_dir():
            raise SystemExit("open_clip_train needs pandas: .venv/bin/pip install pandas "
                             "(or --no-deps --target benchmarks/work/pydeps pandas, used by this script only)")
        oc_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(deps), env.get("PYTHONPATH")]))
    for r in range(rounds):
        order = ["clip-ping", "open_clip_train"] if r % 2 == 0 else ["open_clip_train", "clip-ping"]
        for side in order:
            t0 = time.perf_counter()
            if side == "clip-ping":
                iv = clip_ping_child({"data": str(data), "model": model, "batch": batch, "precision": precision,
                                      "workers": workers, "steps": steps}, env)
            else:
                name = f"bench-{model}-{precision}-{r}-{os.getpid()}"
                shutil.rmtree(logs / name, ignore_errors=True)
                argv = open_clip_argv(abs_csv, logs, name, model, batch, precision, workers, epochs)
                proc = subprocess.run([sys.executable, me, "--_child-open-clip", "--", *argv],
                                      capture_output=True, text=True, env=oc_env)
                text = proc.stdout + proc.stderr
                iv = [batch / float(m.group(4)) for m in _OC_LINE.finditer(text)]
                shutil.rmtree(logs / name, ignore_errors=True)
                if proc.returncode or len(iv) != steps:
                    raise RuntimeError(f"open_clip_train child failed or logged {len(iv)} of {steps} steps:\n{text[-3000:]}")
            wall = time.perf_counter() - t0
            per[side] += iv[warmup:]
            round_medians[side].append(statistics.median(iv[warmup:]))
            walls[side].append({"process_s": round(wall, 2), "steps_s": round(sum(iv), 2)})
            print(f"  [{side}] round {r}: {len(iv)} steps, median {round_medians[side][-1]:.3f} s/step, "
                  f"process {wall:.1f} s", flush=True)
    st = {m: C.stats(v) for m, v in per.items()}
    # one ratio per round (both sides run back to back), so drift of the machine shows as spread
    round_ratios = [o / c for o, c in zip(round_medians["open_clip_train"], round_medians["clip-ping"])]
    return {
        "model": model, "precision": precision, "batch_size": batch, "workers": workers, "epochs": epochs,
        "steps": steps, "warmup_steps_dropped": warmup, "rounds": rounds, "step_s": st, "walls": walls,
        "samples_per_s": {m: sps(batch, s["median"]) for m, s in st.items()},
        "samples_per_s_mean": {m: sps(batch, s["mean"]) for m, s in st.items()},
        "ratio_clip_ping_over_open_clip_throughput": st["open_clip_train"]["median"] / st["clip-ping"]["median"],
        "round_ratios": round_ratios,
        "round_ratio_mean": statistics.fmean(round_ratios),
        "round_ratio_std": statistics.stdev(round_ratios) if len(round_ratios) > 1 else 0.0,
    }


# --------------------------------------------------------------------------- the decoded-image cache


def vs_image_cache(data: Path, model: str, batch: int, precision: str, epochs: int, warmup: int, workers: int,
                   rounds: int) -> dict[str, Any]:
    """Plain-CLIP `Trainer.fit` with ``image_cache`` off and on, each in a fresh process, alternated.

    The step medians leave out the first ``warmup`` steps (the cached side decodes every
    image before its first step); the fit walls include that decode.
    """
    from clip_ping.data.table import open_table

    steps = epochs * (len(open_table(data, "train")) // batch)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    per: dict[str, list[float]] = {"off": [], "on": []}
    round_medians: dict[str, list[float]] = {"off": [], "on": []}
    walls: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(rounds):
        for side in (["off", "on"] if r % 2 == 0 else ["on", "off"]):
            iv = clip_ping_child({"data": str(data), "model": model, "batch": batch, "precision": precision,
                                  "workers": workers, "steps": steps, "image_cache": side}, env)
            per[side] += iv[warmup:]
            round_medians[side].append(statistics.median(iv[warmup:]))
            walls[side].append(round(sum(iv), 2))
            print(f"  [image cache {side}] round {r}: {len(iv)} steps, median {round_medians[side][-1]:.3f} s/step, "
                  f"fit {walls[side][-1]:.1f} s", flush=True)
    st = {m: C.stats(v) for m, v in per.items()}
    step_ratios = [off / on for off, on in zip(round_medians["off"], round_medians["on"])]
    fit_ratios = [off / on for off, on in zip(walls["off"], walls["on"])]
    return {
        "data": str(data), "model": model, "precision": precision, "batch_size": batch, "workers": workers,
        "epochs": epochs, "steps": steps, "warmup_steps_dropped": warmup, "rounds": rounds, "step_s": st,
        "round_step_medians": round_medians, "fit_wall_s": walls,
        "samples_per_s": {m: sps(batch, s["median"]) for m, s in st.items()},
        "speedup_step": st["off"]["median"] / st["on"]["median"], "round_step_speedups": step_ratios,
        "round_fit_speedups": fit_ratios, "fit_speedup_median": statistics.median(fit_ratios),
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("--_child-clip-ping", "--_child-open-clip"):
        threads = int(os.environ.get("BENCH_TORCH_THREADS", "0"))
        if threads:
            torch.set_num_threads(threads)
        if sys.argv[1] == "--_child-clip-ping":
            C.quiet_logging()
            return _child_clip_ping(json.loads(sys.argv[2]))
        return _child_open_clip(sys.argv[3:])

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run: small data, few steps, ViT-XXS only")
    ap.add_argument("--vs-open-clip", action="store_true", help="compare clip-ping plain CLIP with open_clip_train")
    ap.add_argument("--methods", action="store_true", help="step time of every method setting vs CLIP-PING")
    ap.add_argument("--image-cache", action="store_true",
                    help="plain CLIP Trainer.fit with --image-cache off against on (fresh processes, alternated)")
    ap.add_argument("--attention-blocks", action="store_true",
                    help="CLIP-PING steps with open_clip's custom attention block (shipped) against its default block")
    ap.add_argument("--data", default=None,
                    help="--vs-open-clip / --image-cache: a data set folder with train.csv (default: built-in data)")
    ap.add_argument("--method-settings", default=",".join(METHOD_SETTINGS),
                    help=f"--methods: comma list of {', '.join(METHOD_SETTINGS)}")
    ap.add_argument("--xs", dest="xs", action="store_true", default=None, help="also ViT-XS-16 (default on, off with --quick)")
    ap.add_argument("--no-xs", dest="xs", action="store_false", help="skip ViT-XS-16")
    ap.add_argument("--n-train", type=int, default=2000, help="synthetic training pairs (default 2000)")
    ap.add_argument("--batch-size", type=int, default=128, help="batch of ViT-XXS-8-64 (default 128)")
    ap.add_argument("--xs-batch-size", type=int, default=32, help="batch of ViT-XS-16 (default 32)")
    ap.add_argument("--steps", type=int, default=20, help="measured compute-only steps per method (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps discarded (default 3)")
    ap.add_argument("--xs-steps", type=int, default=4, help="measured ViT-XS steps per method (default 4)")
    ap.add_argument("--e2e-steps", type=int, default=30, help="steps of each end-to-end Trainer.fit (default 30)")
    ap.add_argument("--e2e-rounds", type=int, default=2, help="end-to-end runs per method, alternated (default 2)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers end to end (default 2)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16 (default both)")
    ap.add_argument("--breakdown", action="store_true", help="always time CLIP-PING's extra pieces (automatic above the target)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of 3 steps of each method")
    ap.add_argument("--epochs", type=int, default=3, help="--vs-open-clip: epochs of both sides (default 3)")
    ap.add_argument("--vs-rounds", type=int, default=4, help="--vs-open-clip: runs per side, alternated (default 4)")
    ap.add_argument("--vs-models", default="ViT-XXS-8-64", help="--vs-open-clip: comma list of models")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads of the training process(es) (default 0: torch's default, one per core)")
    ap.add_argument("--out", default=None, help="results JSON name (default train / train_vs_open_clip)")
    args = ap.parse_args()
    C.quiet_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["BENCH_TORCH_THREADS"] = str(args.threads)
    precisions = [p for p in args.precisions.split(",") if p]
    if args.quick:
        args.n_train, args.batch_size, args.steps, args.warmup = 256, 32, 4, 1
        args.e2e_steps, args.e2e_rounds, args.epochs, args.vs_rounds = 10, 1, 2, 1
        args.xs_steps, args.xs_batch_size = 2, 16
        if args.xs is None:
            args.xs = False
    xs = True if args.xs is None else args.xs

    result: dict[str, Any] = {"machine": C.machine_facts(), "args": vars(args), "target_ratio": TARGET_RATIO}
    print(f"load average at start: {result['machine']['load_avg_start']}  (torch threads {torch.get_num_threads()})")
    data = Path(args.data).resolve() if args.data else C.prepare_data(args.n_train)

    if args.image_cache:
        result["image_cache"] = []
        rows = []
        for precision in precisions:
            print(f"[image cache] ViT-XXS-8-64 {precision} batch {args.batch_size}, {args.epochs} epochs of {data}",
                  flush=True)
            res = vs_image_cache(data, "ViT-XXS-8-64", args.batch_size, precision, args.epochs, args.warmup,
                                 args.workers, args.vs_rounds)
            result["image_cache"].append(res)
            rows.append([precision, res["steps"], res["step_s"]["off"]["median"], res["step_s"]["on"]["median"],
                         res["speedup_step"], " ".join(f"{x:.3f}" for x in res["round_fit_speedups"])])
        C.print_table(rows, ["prec", "steps", "off step s", "on step s", "step off/on", "fit off/on per round"],
                      "plain CLIP end to end, image cache off vs on (median step after warm-up)")
        path = C.write_json(args.out or "train_image_cache", result)
        print(f"\nload average at end: {result['machine']['load_avg_end']}\nwrote {path}")
        return

    if args.attention_blocks:
        result["attention_blocks"] = []
        rows = []
        for precision in precisions:
            print(f"[attention blocks] ViT-XXS-8-64 {precision} batch {args.batch_size}: {args.warmup}+{args.steps} "
                  "steps each", flush=True)
            res = attention_blocks(data, "ViT-XXS-8-64", args.batch_size, precision, args.steps, args.warmup)
            result["attention_blocks"].append(res)
            rows.append([precision, res["threads"], res["step_s"]["default"]["median"],
                         res["step_s"]["custom"]["median"], res["speedup_custom"], res["speedup_paired_median"]])
        C.print_table(rows, ["prec", "threads", "default s", "custom s", "default/custom", "paired"],
                      "CLIP-PING Trainer.train_step, open_clip's default attention block vs the custom one (median)")
        path = C.write_json(args.out or "train_attention_blocks", result)
        print(f"\nload average at end: {result['machine']['load_avg_end']}\nwrote {path}")
        return

    if args.methods:
        settings = [n for n in args.method_settings.split(",") if n]
        unknown = sorted(set(settings) - set(METHOD_SETTINGS))
        if unknown:
            raise SystemExit(f"unknown method setting(s) {', '.join(unknown)}; known: {', '.join(METHOD_SETTINGS)}")
        result["methods"] = []
        for precision in precisions:
            print(f"[methods] ViT-XXS-8-64 {precision} batch {args.batch_size}: {args.warmup}+{args.steps} steps each",
                  flush=True)
            res = methods_cost(data, "ViT-XXS-8-64", args.batch_size, precision, args.steps, args.warmup, settings)
            result["methods"].append(res)
            C.print_table([[n, precision, res["first_step_s"][n], res["step_s"][n]["median"], res["samples_per_s"][n],
                            res["ratio_over_clip_ping"][n], res["ratio_over_clip"][n]] for n in settings],
                          ["setting", "prec", "first step s", "step s", "sps", "/ CLIP-PING", "/ CLIP"],
                          "every method, compute only (median step; paired per-round ratios)")
        path = C.write_json(args.out or ("train_methods_quick" if args.quick else "train_methods"), result)
        print(f"\nload average at end: {result['machine']['load_avg_end']}\nwrote {path}")
        return

    if args.vs_open_clip:
        rows = []
        result["vs_open_clip"] = []
        for model in [m for m in args.vs_models.split(",") if m]:
            batch = args.batch_size if "XXS" in model else args.xs_batch_size
            for precision in precisions:
                print(f"[vs open_clip_train] {model} {precision} batch {batch}", flush=True)
                res = vs_open_clip(data, model, batch, precision, args.epochs, args.warmup, args.workers, args.vs_rounds)
                result["vs_open_clip"].append(res)
                rows.append([model, precision, batch, res["steps"], res["samples_per_s"]["clip-ping"],
                             res["samples_per_s"]["open_clip_train"], res["ratio_clip_ping_over_open_clip_throughput"],
                             f"{res['round_ratio_mean']:.3f} ± {res['round_ratio_std']:.3f}"])
        C.print_table(rows, ["model", "prec", "batch", "steps", "clip-ping sps", "open_clip_train sps", "clip-ping/oc",
                             "per round"],
                      "clip-ping plain CLIP vs open_clip_train (median step, end to end)")
        path = C.write_json(args.out or ("train_vs_open_clip_quick" if args.quick else "train_vs_open_clip"), result)
        print(f"\nload average at end: {result['machine']['load_avg_end']}\nwrote {path}")
        return

    models = [("ViT-XXS-8-64", args.batch_size, args.steps, args.warmup)]
    if xs:
        models.append(("ViT-XS-16", args.xs_batch_size, args.xs_steps, 1))
    result["compute_only"], result["end_to_end"] = [], []
    rows, brows = [], []
    for model, batch, steps, warmup in models:
        for precision in precisions:
            print(f"[compute only] {model} {precision} batch {batch}: {warmup}+{steps} steps per method", flush=True)
            res = compute_only(data, model, batch, precision, steps, warmup, args.breakdown, args.profile)
            result["compute_only"].append(res)
            rows.append([model, precision, batch, res["samples_per_s"]["clip"], res["samples_per_s"]["clip-ping"],
                         res["ratio_ping_over_clip"], res["ratio_paired_median"],
                         "ok" if res["ratio_ping_over_clip"] <= TARGET_RATIO else "ABOVE"])
            if "breakdown" in res:
                e = res["breakdown"]["extra_s"]
                brows.append([model, precision, res["step_s"]["clip-ping"]["median"] - res["step_s"]["clip"]["median"],
                              e["neighbour_pick"], e["bank_gather_4_rows_sets"], e["heads_forward"],
                              e["heads_and_4_extra_infonce_fwd_bwd"], e["optimizer_and_clip_extra"], e["sum"]])
    C.print_table(rows, ["model", "prec", "batch", "CLIP sps", "PING sps", "PING/CLIP step", "paired", f"<= {TARGET_RATIO}"],
                  "compute only (Trainer.train_step on pre-loaded batches, median)")
    if brows:
        C.print_table(brows, ["model", "prec", "step delta s", "pick", "gather", "heads fwd", "heads+4 nce f+b",
                              "optim extra", "sum"], "CLIP-PING extra time per step, seconds (median of each piece alone)")

    e2e_models = models if xs else models[:1]
    erows = []
    for model, batch, _, _ in e2e_models:
        steps = args.e2e_steps if "XXS" in model else max(4, args.xs_steps + 2)
        warm = args.warmup if "XXS" in model else 1
        for precision in precisions:
            print(f"[end to end] {model} {precision} batch {batch}: Trainer.fit {steps} steps, workers {args.workers}",
                  flush=True)
            res = end_to_end(data, model, batch, precision, steps, warm, args.workers,
                             args.e2e_rounds if "XXS" in model else 1)
            result["end_to_end"].append(res)
            erows.append([model, precision, batch, steps, res["samples_per_s"]["clip"], res["samples_per_s"]["clip-ping"],
                          res["samples_per_s_mean"]["clip"], res["samples_per_s_mean"]["clip-ping"],
                          res["ratio_ping_over_clip"]])
    C.print_table(erows, ["model", "prec", "batch", "steps", "CLIP sps", "PING sps", "CLIP sps(mean)", "PING sps(mean)",
                          "PING/CLIP step"], f"end to end (Trainer.fit, workers {args.workers}, median step after warm-up)")
    path = C.write_json(args.out or ("train_quick" if args.quick else "train"), result)
    print(f"\nload average at end: {result['machine']['load_avg_end']}\nwrote {path}")


if __name__ == "__main__":
    main()
