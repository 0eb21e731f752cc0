"""The options of a training run (`clip-ping train`): one typed dataclass, checked when made."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import Config, option
from ..data.image_cache import CACHE_SETTINGS
from ..errors import ConfigError
from ..objectives import OBJECTIVES
from ..teachers.base import COMPILE_SETTINGS
from .run_logs import parse_log_to

log = logging.getLogger(__name__)
DEFAULT_LAMBDA = 0.5  # weight of each of the NN and XNN terms (docs/METHOD.md)


@dataclass
class TrainConfig(Config):
    data: str = option("data/synth", "data set folder (train.csv or train.shards.json), a CSV/TSV file or a shard descriptor")
    out: str = option("runs/train", "run folder: config, metrics, checkpoints, evaluation")
    banks: str | None = option(None, "feature bank folder with neighbours (default: <data>/banks)")
    method: str = option("clip-ping", "training objective: clip-ping; a-clip-ping (online teachers); plain clip (the "
                         "baseline); the peers declip-nns, slip, relational (docs/METHOD.md has one row per method)",
                         choices=tuple(OBJECTIVES))
    model: str = option("ViT-XXS-8-64", "student: an open_clip model name (shipped: ViT-XXS-8-64, ViT-XS-16)")
    init_from: str | None = option(None, "start the student from pretrained open_clip weights: a weights file "
                                   "(.pt/.bin/.safetensors, or a clip-ping checkpoint), a model folder (local-dir:PATH, "
                                   "e.g. a clip-ping export), or MODEL:TAG / hf-hub:ORG/REPO fetched by open_clip (needs "
                                   "the network or its cache); none: random weights from --seed. A resumed run takes "
                                   "its weights from its checkpoint")
    lambda_nn: float | None = option(None, "weight of the NN (intra-modal) terms (none: 0.5 for the methods with "
                                     "NN/XNN terms, 0 for the others)", bounds=">= 0")
    lambda_xnn: float | None = option(None, "weight of the XNN (cross-modal) terms (none: 0.5 for the methods with "
                                      "NN/XNN terms, 0 for the others)", bounds=">= 0")
    neighbor_topk: int = option(1, "use the nearest neighbour (1) or draw one of the k nearest each step", bounds=">= 1")
    neighbor_source: str = option("dataset", "where neighbours come from: the whole data set (precomputed) or a FIFO queue "
                                  "of recent samples",
                                  choices=("dataset", "queue"))
    queue_size: int = option(4096, "FIFO queue length for neighbor_source=queue and for declip-nns", bounds=">= 1")
    teacher_image_size: int | None = option(None, "a-clip-ping: run the online image teacher at this resolution "
                                            "(none: the bank's, i.e. the teacher's own unless extract set --teacher-image-size)",
                                            bounds="[16, 2048]")
    teacher_compile: str = option("auto", "a-clip-ping: torch.compile the online image teacher (auto: on a CPU with a "
                                  "C++ compiler, for 25,000 teacher images or more; ~1.26x faster than the eager teacher, whose "
                                  "batch norms are folded, after a ~20 s compile; features match the uncompiled teacher's "
                                  "to ~1e-5)", choices=COMPILE_SETTINGS)
    targets: str = option("teacher", "what u and v are pulled to: the neighbours' teacher features through the heads; "
                          "student (with neighbor_source=queue): the student's own stored embeddings of the neighbours; "
                          "student_table: the student's stored embeddings from a table over the whole data set, "
                          "the teacher target for neighbours not embedded yet in this run",
                          choices=("teacher", "student", "student_table"))
    xnn_pairing: str = option("own", "XNN targets: own (u_i to the caption of p_i, v_i to the image of q_i) or other "
                              "(through the other modality's neighbour: u_i to the caption of q_i, v_i to the image of p_i)",
                              choices=("own", "other"))
    collisions: str = option("leave", "NN/XNN targets that collide in a batch (two rows share a neighbour, or a row's "
                             "neighbour is itself in the batch): leave (negatives), mask (not negatives), "
                             "positives (extra positives, multi-positive InfoNCE)", choices=("leave", "mask", "positives"))
    peer_weight: float | None = option(None, "weight of a peer method's extra term (declip-nns, slip, relational; "
                                       "none: the paper's, see docs/METHOD.md)", bounds=">= 0")
    peer_temperature: float | None = option(None, "temperature of slip's SimCLR term and of relational's similarity "
                                            "distributions (none: 0.1)", bounds="> 0")
    head: str = option("mlp", "teacher-to-student heads h_A, h_B: mlp (chosen on the val split, BENCHMARKS.md) or linear",
                       choices=("linear", "mlp"))
    logit_scales: str = option("shared", "one logit scale for all terms, or one per term", choices=("shared", "per_term"))
    duplicate_captions: str = option("none", "rows of a batch with identical captions, in the CLIP term of every method: "
                                     "none (negatives of each other, as in CLIP), mask (not negatives), "
                                     "positives (extra positives, multi-positive InfoNCE)",
                                     choices=("none", "mask", "positives"))
    epochs: int = option(5, "passes over the training data (ignored when steps is set)", bounds=">= 1")
    steps: int | None = option(None, "total optimisation steps (overrides epochs)", bounds=">= 1")
    batch_size: int = option(128, "global batch size (split over processes)", bounds=">= 2")
    lr: float = option(1e-3, "peak learning rate", bounds="> 0")
    min_lr: float = option(0.0, "final learning rate of the cosine schedule", bounds=">= 0")
    warmup_steps: int = option(50, "linear warm-up steps", bounds=">= 0")
    weight_decay: float = option(0.1, "AdamW weight decay (not applied to gains, biases or the logit scale)", bounds=">= 0")
    beta1: float = option(0.9, "AdamW beta1", bounds="[0, 1)")
    beta2: float = option(0.98, "AdamW beta2", bounds="[0, 1)")
    eps: float = option(1e-6, "AdamW epsilon", bounds="> 0")
    grad_clip: float | None = option(1.0, "clip the gradient norm to this value (none to disable)", bounds=">= 0")
    precision: str = option("fp32", "fp32; bf16 autocast (also on CPU); or fp16 autocast with a gradient scaler",
                            choices=("fp32", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the student's forward (pays off on long GPU runs)")
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, slower)")
    accum_steps: int = option(1, "split each batch into this many micro-batches (same contrastive batch, less memory)", bounds=">= 1")
    local_loss: bool = option(False, "with several processes, score local rows against the global batch only")
    seed: int = option(0, "seed of weights, data order, augmentation and neighbour draws", bounds="[0, 4294967295]")
    workers: int = option(2, "data loader worker processes", bounds=">= 0")
    prefetch_batches: int = option(2, "batches each loader worker prepares ahead", bounds=">= 1")
    image_cache: str = option("auto", "keep the decoded training images in memory, decoded once per run (same pixels, "
                              "same results): auto when each image is read twice or more and they fit "
                              "--image-cache-gb; random data_mode only", choices=CACHE_SETTINGS)
    image_cache_gb: float = option(4.0, "memory the image cache may take, per process (GiB)", bounds="> 0")
    threads: int = option(0, "torch threads of the training process (0: torch's default)", bounds=">= 0")
    data_mode: str = option("random", "random: shuffled random access (CSV or shards, exact resume at any step); "
                            "stream: read WebDataset shards sequentially with a shuffle buffer", choices=("random", "stream"))
    shuffle_buffer: int = option(2000, "samples in the shuffle buffer of data_mode=stream", bounds=">= 0")
    device: str = option("auto", "torch device: auto (this process's GPU under torchrun, else the CPU), cpu, cuda, cuda:N")
    log_every: int = option(10, "steps between metric log lines", bounds=">= 1")
    save_every: int = option(200, "steps between checkpoints (one is always written at the end)", bounds=">= 1")
    keep_checkpoints: int = option(2, "step checkpoints kept besides latest.pt", bounds=">= 0")
    resume: str | None = option(None, "'latest': continue the run in --out (an error when it has no checkpoint); "
                                "'auto': continue it when it has one, else start; or a checkpoint path")
    overwrite: bool = option(False, "replace a run already in --out (its checkpoints, metrics and config) instead of refusing")
    max_skipped_fraction: float = option(0.1, "stop when more than this share of the loaded images could not be decoded", bounds="[0, 1]")
    progress: bool = option(True, "show a progress bar")
    tensorboard: bool = option(True, "write TensorBoard event files under <out>/tensorboard (false: drop it from log_to)")
    log_to: str = option("auto", "where metrics go, comma-separated: jsonl, tensorboard, wandb (WANDB_MODE=offline "
                                 "works); auto: jsonl + tensorboard when installed; none (see clip_ping.training.run_logs)")
    run_name: str | None = option(None, "the run's name in W&B (default: the run folder's name)")

    def total_steps(self, n_pairs: int) -> int:
        """Steps of the run on ``n_pairs`` training pairs: ``steps``, else ``epochs`` epochs of whole batches."""
        return self.steps if self.steps is not None else self.epochs * (n_pairs // self.batch_size)

    def validate(self) -> None:
        self._settle_lambdas()
        parse_log_to(self.log_to)
        # one-number ranges are the fields' bounds (checked before this); here, what relates two fields
        if self.targets == "student" and self.neighbor_source != "queue":
            raise ConfigError("config key 'targets': student targets need neighbor_source=queue")
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"config key 'accum_steps': {self.accum_steps} does not divide batch_size {self.batch_size}")
        if self.min_lr > self.lr:
            raise ConfigError(f"config key 'min_lr': {self.min_lr} is above the peak rate lr {self.lr}")
        if self.resume is not None and self.overwrite:
            raise ConfigError("config keys 'resume' and 'overwrite' contradict each other: continue a run or replace it")
        if self.steps is not None and self.warmup_steps > self.steps:
            log.warning("warmup_steps (%d) is longer than the run (%d steps): the rate never reaches lr",
                        self.warmup_steps, self.steps)

    def with_config_file(self, path: Path) -> "TrainConfig":
        """Resuming from a run's own config.yaml continues that run folder, wherever it was copied to."""
        folder = path.resolve().parent
        if self.resume is not None and ((folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file()):
            return dataclasses.replace(self, out=str(folder))
        return self

    @property
    def neighbor_weights(self) -> tuple[float, float]:
        """(lambda_nn, lambda_xnn), as settled when the config was made."""
        assert self.lambda_nn is not None and self.lambda_xnn is not None
        return self.lambda_nn, self.lambda_xnn

    def _settle_lambdas(self) -> None:
        """The lambdas say what the method says: 0.5 by default where it has NN/XNN terms, 0 elsewhere;
        a weight given to a method without those terms is refused rather than recorded and ignored."""
        has_terms = OBJECTIVES[self.method].weighs_neighbor_terms
        for key in ("lambda_nn", "lambda_xnn"):
            value = getattr(self, key)
            if value is None:
                setattr(self, key, DEFAULT_LAMBDA if has_terms else 0.0)
            elif not has_terms and value != 0:
                raise ConfigError(f"config key '{key}': --method {self.method} has no NN/XNN terms to weigh "
                                  f"(drop it, or use --method clip-ping)")


def comparable_options(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A run's recorded options (config.yaml) without the lambdas of a method that has no NN/XNN terms.

    Runs made before the lambdas followed the method recorded 0.5 there, today's record 0; neither is
    read, so both compare equal. The one rule for the report's settings and the benchmark's run check.
    """
    options = dict(recorded)
    objective = OBJECTIVES.get(str(options.get("method")))
    if objective is not None and not objective.weighs_neighbor_terms:
        options.pop("lambda_nn", None)
        options.pop("lambda_xnn", None)
    return options


# --------------------------------------------------------------------------- what a resumed run may change
# Every field of TrainConfig is in exactly one of these groups (a test fails for a field in none).

#: Settings that shape the run's arithmetic (its weights, data order, loss, schedule): a resumed run
#: that changed one would be two runs under one name, so a change is refused.
RESUME_FIXED = frozenset({
    "data", "banks", "method", "model", "init_from", "lambda_nn", "lambda_xnn", "neighbor_topk", "neighbor_source",
    "queue_size", "teacher_image_size", "targets", "xnn_pairing", "collisions", "peer_weight", "peer_temperature",
    "head", "logit_scales", "duplicate_captions", "batch_size", "lr", "min_lr", "warmup_steps", "weight_decay",
    "beta1", "beta2", "eps", "grad_clip", "precision", "local_loss", "seed", "data_mode", "shuffle_buffer",
})
#: Settings a resumed run may change: its length (to extend it), how it is logged and saved, and how
#: fast it runs on which resources (the same arithmetic, up to floating-point rounding of compiled or
#: other-device kernels). A change is recorded in the run's history with the step it took effect at.
RESUME_MAY_CHANGE = frozenset({
    "epochs", "steps", "teacher_compile", "compile", "grad_checkpointing", "accum_steps", "workers",
    "prefetch_batches", "image_cache", "image_cache_gb", "threads", "device", "log_every", "save_every",
    "keep_checkpoints", "max_skipped_fraction", "progress", "tensorboard", "log_to", "run_name",
})
#: How this command is invoked, not a setting of the run.
RESUME_INVOCATION = frozenset({"out", "resume", "overwrite"})
