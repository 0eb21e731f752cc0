"""``--dry-run``: check a stage's whole configuration and print its plan, doing no work.

Each plan opens the data (so a missing shard, a bank of other data or a batch
that does not split over the processes fails here, before any work starts)
and reports what the stage would do: rows, steps, memory, disk. Sizes are
computed from shapes; training compute is a FLOP count of one real
forward and backward pass of the student, not an estimate of speed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.table import open_table
from .errors import ConfigError

GB = 1e9


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / GB:.2f} GB"


def plan_extract(cfg: Any) -> dict[str, Any]:
    from .banks.format import MANIFEST, WORK_DIR
    from .teachers import load_image_teacher, load_text_teacher

    table = open_table(cfg.data, cfg.split)
    image_dim = load_image_teacher(cfg.image_teacher, "cpu").dim
    text_dim = load_text_teacher(cfg.text_teacher, "cpu").dim
    n = len(table)
    itemsize = np.dtype(cfg.dtype).itemsize
    out = Path(cfg.out)
    state = "complete" if (out / MANIFEST).is_file() else "resume" if (out / WORK_DIR).is_dir() else "new"
    n_chunks = -(-n // cfg.chunk_size)
    return {"stage": "extract", "rows": n, "skipped_rows": dict(getattr(table, "skipped", {}) or {}),
            "teachers": {"image": cfg.image_teacher, "image_dim": image_dim, "text": cfg.text_teacher, "text_dim": text_dim},
            "chunks": n_chunks, "processes": _world(), "bank_folder": str(out), "bank_state": state,
            "bank_disk": _gb(n * (image_dim + text_dim) * itemsize + n * (1 + 8 + 8))}


def plan_neighbors(cfg: Any) -> dict[str, Any]:
    from .banks.format import open_banks

    banks = open_banks(cfg.banks)
    n = len(banks)
    dims = banks.image_dim + banks.text_dim
    per_table = n * cfg.k * (8 + 4)  # int64 indices + float32 scores
    return {"stage": "neighbors", "rows": n, "dims": {"image": banks.image_dim, "text": banks.text_dim},
            "k": cfg.k, "method": cfg.method, "processes": _world(),
            "exact_search_gflop": round(2.0 * n * n * dims / GB, 1),
            "bank_in_float32": _gb(n * max(banks.image_dim, banks.text_dim) * 4),
            "tables_disk": _gb(2 * per_table)}


def plan_train(cfg: Any) -> dict[str, Any]:
    from .distributed import resolve_device
    from .model.student import create_student, embed_dim
    from .objectives import ObjectiveSetup, build_objective

    world = _world()
    if cfg.batch_size % world:
        raise ConfigError(f"config key 'batch_size': {cfg.batch_size} does not split over {world} processes")
    device = resolve_device(cfg.device) if world == 1 else torch.device(cfg.device if cfg.device != "auto" else "cpu")
    table = open_table(cfg.data, "train")
    n = len(table)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"config key 'batch_size': {cfg.batch_size} is larger than the data set ({n} pairs)")
    total_steps = cfg.total_steps(n)
    model, transform, _, _ = create_student(cfg.model, seed=cfg.seed)
    init = None
    if cfg.init_from:  # a local source is read and checked against the student; a hub name is fetched at start
        from .hub.pretrained import init_student, is_remote

        init = (f"{cfg.init_from} (fetched by open_clip when the run starts)" if is_remote(cfg.init_from)
                else init_student(model, cfg.init_from, cfg.model)["file"])
    objective = build_objective(ObjectiveSetup(cfg, table, embed_dim(model), torch.device("cpu"), transform))  # opens and checks banks
    params = sum(p.numel() for p in model.parameters())
    extra = sum(p.numel() for p in objective.parameters())
    flop_per_sample, activation_bytes = student_cost_per_sample(model, cfg.precision)
    state_bytes = (params + extra) * 4 * 4  # weights, gradients, AdamW's two moments
    checkpoint_bytes = (params + extra) * 4 * 3
    return {
        "stage": "train", "method": cfg.method, "model": cfg.model, "init_from": init, "device": str(device), "processes": world,
        "rows": n, "skipped_rows": dict(getattr(table, "skipped", {}) or {}),
        "global_batch": cfg.batch_size, "per_process_batch": cfg.batch_size // world,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "epochs": round(total_steps / steps_per_epoch, 2),
        "parameters": {"student": params, "objective": extra},
        "train_flop_per_sample": f"{flop_per_sample / GB:.2f} GFLOP (forward + backward, counted)",
        "train_flop_total": f"{flop_per_sample * cfg.batch_size * total_steps:.3g} FLOP",
        "weights_and_optimizer_memory": _gb(state_bytes) + " per process",
        "activation_memory": _gb(activation_bytes * cfg.batch_size // world)
        + f" per process ({activation_bytes / 1e6:.1f} MB per pair, {cfg.precision}; measured as a CPU step runs "
          "attention: an upper bound where flash attention runs)",
        "checkpoint_disk": _gb(checkpoint_bytes * (cfg.keep_checkpoints + 1)),
        "uses_banks": objective.uses_banks,
    }


def plan_config_only(cfg: Any) -> dict[str, Any]:
    """Stages without data to open beyond their config: the validated configuration."""
    return {"stage": type(cfg).__name__, "config": dataclasses.asdict(cfg)}


def plan_demo(cfg: Any) -> dict[str, Any]:
    """The demo's configuration, and what its unset options resolve to on this machine."""
    from .demo import demo_jobs, train_precision
    from .training.train_config import TrainConfig

    return {**plan_config_only(cfg), "training_precision": train_precision(cfg.precision, TrainConfig.device),
            "training_processes_side_by_side": demo_jobs(cfg.jobs, TrainConfig.device)}


def student_cost_per_sample(model: torch.nn.Module, precision: str = "fp32") -> tuple[float, float]:
    """(FLOPs, activation bytes) of one forward and backward pass of one image-text pair.

    FLOPs are counted by torch; activations are the bytes of the tensors autograd
    saves for the backward pass (what training memory grows with per sample).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .distributed import training_autocast

    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    context = int(getattr(model, "context_length", 77))
    images = torch.zeros(2, 3, *size)
    texts = torch.zeros(2, context, dtype=torch.long)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # shared storages count once
        return t

    counter = FlopCounterMode(display=False)
    # the context of a CPU training step: in bf16/fp16 its attention runs the math kernel, which saves more
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            training_autocast(torch.device("cpu"), precision):
        u = model.encode_image(images, normalize=True)
        v = model.encode_text(texts, normalize=True)
        (u.float() * v.float()).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) / 2, sum(saved.values()) / 2


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
