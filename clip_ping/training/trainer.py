"""Stage 2: train a student dual encoder with one objective (CLIP, CLIP-PING, ...).

One step: a batch of (image, caption, index) -> student embeddings u, v ->
``objective.loss(u, v, batch)`` -> backward -> optimiser -> ``objective.after_step``.
What a method adds beside the student (banks, neighbours, heads, queues) lives
in its objective (`clip_ping.objectives`); the trainer knows only the loop,
the schedule, the data order and checkpoints.

Everything random is derived from (seed, epoch, step, sample index) rather
than carried as state (`clip_ping.data.order`), so a run stopped at any step
and resumed from its checkpoint continues exactly as if it had never stopped.

The options are `clip_ping.training.train_config.TrainConfig`; the run folder's rules
are in `clip_ping.training.run_folder`. This module is one job, the `Trainer`'s loop and
its state (step, epoch, loader, checkpoints), kept together (over 450 lines because
what a resume restores must be read in one place).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import distributed as dist_utils
from ..data.batch_transform import split_at_batch
from ..data.image_cache import GIB, DecodedImages, cache_decision
from ..data.order import RunBatches, SeededAugmentation, collate_and_prepare, ignore_stop_signals
from ..data.pairs import PairDataset, tokenize_captions
from ..data.table import open_table
from ..errors import ClipPingError, ConfigError
from ..hub.pretrained import init_student
from ..io import FolderClaim
from ..model.student import StudentEncoders, create_student, embed_dim, enable_grad_checkpointing, nonfinite_tensors
from ..objectives import ObjectiveSetup, StepContext, build_objective
from .checkpoints import (
    load_checkpoint,
    numpy_rng_state,
    objective_state_of_v1,
    plain,
    resolve_resume,
    save_checkpoint,
    set_numpy_rng_state,
    settings_that_differ,
)
from .run_folder import RUN_FILES, claim_run_folder, config_to_record, record_settings, resume_changes, truncate_metrics
from .run_logs import RunLogs, parse_log_to
from .schedule import warmup_cosine_lr
from .train_config import TrainConfig

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of the learnable logit scale


class TrainingDiverged(ClipPingError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------- optimiser


def parameter_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: gains, biases and logit scales are excluded."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------- the run


@dataclass
class StepResult:
    loss: float
    terms: dict[str, float]


class Trainer:
    """The loop: owns the student, the objective, the optimiser, the data order and checkpoints."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = dist_utils.resolve_device(cfg.device)
        self.rank, self.world = dist_utils.init_from_env(self.device)
        dist_utils.warn_if_bf16_is_emulated(cfg.precision, self.device, log, "training runs")
        if cfg.batch_size % self.world:
            raise ConfigError(f"config key 'batch_size': {cfg.batch_size} does not split over {self.world} processes")
        self.run_dir = Path(cfg.out)
        self.claim: FolderClaim | None = None  # the run folder's, held by process 0 while it trains
        self.table = open_table(cfg.data, "train")
        self.data_fingerprint = self.table.fingerprint()  # once: it reads every row's file size
        self.image_cache = self._image_cache()
        if self.image_cache is not None:
            self.table = self.image_cache  # the objective's extra views read through it too
        self.model, self.preprocess_train, _, self.tokenizer = create_student(cfg.model, seed=cfg.seed)
        if cfg.init_from and cfg.resume is None:
            # before the run folder is touched, so a source that cannot be read costs nothing; a resumed run's
            # weights are its checkpoint's, so the source is read only if there is none (`fit`)
            init_student(self.model, cfg.init_from, cfg.model)
        self.model.to(self.device)
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(self.model)
        self.objective = build_objective(ObjectiveSetup(cfg, self.table, embed_dim(self.model), self.device,
                                                        self.preprocess_train))
        self.encoders = self._wrap(StudentEncoders(self.model, self.objective))
        # fp16 needs loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        # the fused kernel updates all tensors in one pass: 3x faster than the per-tensor loop on CPU
        self.optimizer = torch.optim.AdamW(parameter_groups([self.model, self.objective], cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.steps_per_epoch = len(self.table) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"config key 'batch_size': {cfg.batch_size} is larger than the data set ({len(self.table)} pairs)")
        self.total_steps = cfg.total_steps(len(self.table))
        self.step = 0
        self.epoch, self.batch_in_epoch = 0, 0  # data position, saved in checkpoints
        self._stop_signal: str | None = None
        self.resumed_changes: dict[str, tuple[Any, Any]] = {}  # settings this resume changed: {key: (old, new)}
        self._warned_skips = False
        self._run_batches: Iterator[dict[str, Any]] | None = None  # the random-mode loader, kept across epochs
        self._run_next: tuple[int, int] = (-1, -1)  # (epoch, batch) it yields next
        self.caption_tokens: torch.Tensor | None = None  # made with the image cache's fill
        # per sample the crop, per batch the float scaling and normalisation (the same tensors, less work)
        self.sample_transform, self.finish_images = split_at_batch(self.preprocess_train)

    # -- set-up ---------------------------------------------------------------

    def _image_cache(self) -> DecodedImages | None:
        """The decoded-image cache when this run uses one (filled by the first loader), else None."""
        cfg = self.cfg
        if cfg.data_mode != "random" or len(self.table) == 0:
            return None
        reads = cfg.total_steps(len(self.table)) * cfg.batch_size / self.world / len(self.table)
        use, why = cache_decision(cfg.image_cache, self.table, reads, cfg.image_cache_gb)
        log.info("image cache: %s (%s)", "on" if use else "off", why)
        return DecodedImages(self.table) if use else None

    def _fill_image_cache(self) -> None:
        cache = self.image_cache
        if cache is None or cache.filled:
            return
        started = time.perf_counter()
        if cache.fill(self.cfg.workers, self.cfg.progress and dist_utils.is_main_process(),
                      int(self.cfg.image_cache_gb * GIB)):
            log.info("image cache: %d images, %.2f GiB, decoded in %.1f s", len(cache), cache.nbytes / GIB,
                     time.perf_counter() - started)
            # the captions of a data set held in memory are tokenized once too, not again every epoch
            started = time.perf_counter()
            self.caption_tokens = tokenize_captions(self.table.captions, self.tokenizer)
            log.info("caption tokens: %d captions tokenized in %.1f s", len(self.caption_tokens),
                     time.perf_counter() - started)
        else:  # over budget: the wrapper stays empty and reads from the table
            self.image_cache = None

    def _wrap(self, encoders: StudentEncoders) -> torch.nn.Module:
        """DDP over several processes (bucketed gradient all-reduce overlapped with the
        backward pass), and torch.compile when asked."""
        wrapped: Any = encoders
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(
                encoders, device_ids=[self.device] if self.device.type == "cuda" else None, broadcast_buffers=False,
                find_unused_parameters=self.objective.has_unused_parameters)
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    # -- checkpoints ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "model_name": self.cfg.model,
            "method": self.cfg.method,
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "config": plain(dataclasses.asdict(config_to_record(self.cfg))),
            "data_fingerprint": self.data_fingerprint,
            "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state(), "python": random.getstate()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("model_name") != self.cfg.model:
            raise ConfigError(f"checkpoint is of model {state.get('model_name')}, this run trains {self.cfg.model}")
        if state.get("data_fingerprint") != self.data_fingerprint:
            raise ConfigError("checkpoint was trained on another data set (fingerprint differs); refusing to resume")
        method = state.get("method", "clip-ping" if state.get("guidance") is not None else "clip")
        if method != self.cfg.method:
            raise ConfigError(f"checkpoint was trained with --method {method}, this run is --method {self.cfg.method}; "
                              "resume with the same method or start a new run folder")
        self.model.load_state_dict(state["model"])
        try:
            self.objective.load_state_dict(state.get("objective") or objective_state_of_v1(state))
        except (RuntimeError, KeyError, ValueError):
            raise ConfigError(f"the checkpoint's {self.cfg.method} state does not fit this run: "
                              f"{settings_that_differ(state.get('config') or {}, self.cfg) or 'its heads differ'}; "
                              "resume with the run's own settings (its config.yaml)") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state.get("epoch", self.step // self.steps_per_epoch))
        self.batch_in_epoch = int(state.get("batch_in_epoch", self.step % self.steps_per_epoch))
        torch.set_rng_state(state["rng"]["torch"])
        set_numpy_rng_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def save(self) -> Path | None:
        """Write a checkpoint of this step; a state that is no longer finite is never written."""
        bad = nonfinite_tensors(self.model.state_dict()) + nonfinite_tensors(self.objective.state_dict())
        if bad:
            raise TrainingDiverged(f"the weights became NaN or infinite by step {self.step} ({len(bad)} tensors, e.g. "
                                   f"{bad[0]}); {self._last_good()} (try a lower --lr or --precision fp32)")
        if not dist_utils.is_main_process():
            return None
        return save_checkpoint(self.state_dict(), self.run_dir / "checkpoints", self.step, keep=self.cfg.keep_checkpoints,
                               claim=self.claim)

    def _last_good(self) -> str:
        latest = self.run_dir / "checkpoints" / "latest.pt"
        if latest.is_file():
            return f"the last good checkpoint, {latest}, is kept"
        return "no checkpoint was written"

    # -- one step ---------------------------------------------------------------

    def _encode(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, v, *_ = self._encode_all(images, texts)
        return u, v

    def _encode_all(self, images: torch.Tensor, texts: torch.Tensor, views: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, ...]:
        """(u, v, embeddings of each extra view) in fp32."""
        with dist_utils.training_autocast(self.device, self.cfg.precision):
            out = self.encoders(images, texts) if views is None else self.encoders(images, texts, views)
        return tuple(t.float() for t in out)

    def _loss(self, u: torch.Tensor, v: torch.Tensor, batch: dict[str, Any], grad_share: float = 1.0,
              views: tuple[torch.Tensor, ...] = ()) -> dict[str, torch.Tensor]:
        ctx = StepContext(step=self.step, logit_scale=self.model.logit_scale.exp(), grad_share=grad_share, views=views)
        return self.objective.loss(u, v, batch, ctx)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} at step {self.step}; {self._last_good()} "
                                   "(try a lower --lr or --precision fp32)")

    def train_step(self, batch: dict[str, Any]) -> StepResult:
        cfg = self.cfg
        lr = warmup_cosine_lr(self.step, cfg.lr, cfg.warmup_steps, self.total_steps, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = batch["image"].to(self.device, non_blocking=True)
        texts = batch["text"].to(self.device, non_blocking=True)
        views = batch.get("image_views")
        if views is not None:
            views = views.to(self.device, non_blocking=True)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.accum_steps == 1:
            u, v, *view_embeddings = self._encode_all(images, texts, views)
            out = self._loss(u, v, batch, views=tuple(view_embeddings))
            self._check_finite(out["loss"])
            self.scaler.scale(out["loss"]).backward()
        else:
            out = self._accumulate(images, texts, batch, views)
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
        self.objective.after_step(batch)
        self.step += 1
        terms = {k: float(v.detach()) for k, v in out.items()}
        if self.world > 1:  # with --local-loss each process saw a different share
            terms = dist_utils.all_reduce_mean(terms)
        loss_value = terms.pop("loss")
        terms["lr"] = lr
        terms["logit_scale"] = float(self.model.logit_scale.detach().exp())
        return StepResult(loss_value, terms)

    def _accumulate(self, images: torch.Tensor, texts: torch.Tensor, batch: dict[str, Any],
                    views: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Gradient accumulation that keeps the contrastive batch whole.

        First every micro-batch is embedded without gradients; then each is
        embedded again with gradients and the loss of the *whole* batch is taken
        with only that micro-batch live. Summed over micro-batches, this is the
        gradient of the full-batch loss while holding the activations of one
        micro-batch at a time.
        """
        chunks = torch.arange(len(batch["index"])).chunk(self.cfg.accum_steps)
        def encode(c: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self._encode_all(images[c], texts[c], None if views is None else views[c])

        with torch.no_grad():
            cached = [encode(c) for c in chunks]
        out: dict[str, torch.Tensor] = {}
        for j, c in enumerate(chunks):
            # DDP all-reduces the gradients once, after the last micro-batch
            last = j == len(chunks) - 1
            with nullcontext() if last or self.world == 1 else self.encoders.no_sync():
                live = encode(c)
                # per output (u, v, each view): the live micro-batch between the cached ones
                u, v, *view_embeddings = (torch.cat([live[k] if i == j else cached_i[k] for i, cached_i in enumerate(cached)])
                                          for k in range(len(live)))
                out = self._loss(u, v, batch, grad_share=1.0 / len(chunks), views=tuple(view_embeddings))
                self._check_finite(out["loss"])
                self.scaler.scale(out["loss"]).backward()
        return out

    # -- the loop ---------------------------------------------------------------

    def _batches(self, epoch: int, start_batch: int) -> Iterator[dict[str, Any]]:
        """The batches of one epoch from ``start_batch`` on; with several processes the
        epoch ends for all as soon as one runs out (streams may differ in length)."""
        if self.cfg.data_mode == "random":
            # one loader for the rest of the run, continued from epoch to epoch
            if self._run_batches is None or self._run_next != (epoch, start_batch):
                self._run_batches = iter(self._loader(epoch, start_batch))
            for b in range(start_batch, self.steps_per_epoch):
                batch = next(self._run_batches, None)
                if batch is None:  # the run's last step
                    return
                self._run_next = (epoch, b + 1) if b + 1 < self.steps_per_epoch else (epoch + 1, 0)
                yield batch
            return
        batches = self._stream_loader(epoch)
        for b, batch in enumerate(batches):
            if self.world > 1 and not dist_utils.all_ranks_true(True):
                return
            if b >= start_batch:  # resuming mid-epoch replays the same stream up to where it stopped
                yield batch
        if self.world > 1:
            dist_utils.all_ranks_true(False)

    def _stream_loader(self, epoch: int) -> DataLoader:
        from ..data.shards import ShardTable
        from ..data.stream import ShardStream

        if not isinstance(self.table, ShardTable):
            raise ConfigError("config key 'data_mode': stream needs WebDataset shards (a <split>.shards.json); "
                              "convert a CSV data set with clip-ping data convert")
        if self.objective.view_transforms(self.preprocess_train):
            raise ConfigError(f"config key 'data_mode': --method {self.cfg.method} needs extra views of each image, "
                              "which only data_mode=random provides")
        stream = ShardStream(self.table, self.sample_transform, shuffle_buffer=self.cfg.shuffle_buffer,
                             shuffle_shards=True, seed=self.cfg.seed)
        stream.set_epoch(epoch)
        # the generator fixes each worker's seed, hence its augmentations, for this epoch
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return DataLoader(stream, batch_size=self.cfg.batch_size // self.world, drop_last=True, generator=generator,
                          **self._loader_options())

    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        """The batches of the rest of the run, from batch ``start_batch`` of ``epoch`` (at step ``self.step``)."""
        self._fill_image_cache()  # before the workers fork, so they share its pages
        # captions are tokenized per batch in collate (one tokenizer call per batch costs less than one per
        # sample), unless the cache's fill tokenized them all
        views = self.objective.view_transforms(self.preprocess_train)
        dataset = SeededAugmentation(PairDataset(self.table, self.sample_transform, view_transforms=views,
                                                 caption_tokens=self.caption_tokens), self.cfg.seed)
        sampler = RunBatches(len(self.table), self.cfg.batch_size, self.cfg.seed, epoch, start_batch, self.step,
                             self.total_steps, self.rank, self.world)
        return DataLoader(dataset, batch_sampler=sampler, **self._loader_options(prepare=self.objective.batch_preparer()))

    def _loader_options(self, prepare: Any = None) -> dict[str, Any]:
        options: dict[str, Any] = {"num_workers": self.cfg.workers, "worker_init_fn": ignore_stop_signals,
                                   "collate_fn": partial(collate_and_prepare, tokenizer=self.tokenizer, prepare=prepare,
                                                         finish_images=self.finish_images),
                                   # page-locked batches copy to the GPU asynchronously (non_blocking)
                                   "pin_memory": self.device.type == "cuda"}
        if self.cfg.workers > 0:
            options["prefetch_factor"] = self.cfg.prefetch_batches
        return options

    def _prepare_run_folder(self) -> bool:
        """Refuse to mix two runs in one folder; continue or replace a run only when asked.
        Process 0 decides for all, before anything is written. Returns whether a checkpoint was loaded."""
        cfg, run = self.cfg, self.run_dir
        problem: str | None = None
        if dist_utils.is_main_process():  # process 0 writes the folder, and holds its lock while the run trains
            try:
                self.claim = claim_run_folder(cfg, run)
            except ClipPingError as exc:
                problem = str(exc)
        if self.world > 1 and not dist_utils.all_ranks_true(problem is None):
            raise ConfigError(problem or f"process 0 refused the run folder {run}")
        if problem:
            raise ConfigError(problem)
        if cfg.resume is None or cfg.overwrite:
            return False
        path = resolve_resume(cfg.resume if cfg.resume != "auto" else "latest", run)
        if path is None:
            if cfg.resume == "latest":
                raise ConfigError(f"--resume latest: no checkpoint to continue in {run / 'checkpoints' / 'latest.pt'}; "
                                  "start the run without --resume (or with --resume auto)")
            return False
        state = load_checkpoint(path)
        self.resumed_changes = resume_changes(state.get("config") or {}, cfg, str(path))
        self.load_state_dict(state)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _check_skipped(self, skipped: int, loaded: int) -> None:
        """Stop when too many images could not be decoded; warn once when some could not.
        With several processes the counts of all are used, so all stop together."""
        if self.world > 1:
            skipped, loaded = dist_utils.all_reduce_sum([skipped, loaded])
        if loaded and skipped / loaded > self.cfg.max_skipped_fraction and loaded >= self.cfg.batch_size:
            raise ClipPingError(f"{skipped} of the {loaded} images loaded so far could not be decoded "
                                f"({100 * skipped / loaded:.1f} %, more than --max-skipped-fraction "
                                f"{self.cfg.max_skipped_fraction}); the log names them. Fix the data or raise the limit")
        if skipped and not self._warned_skips:
            self._warned_skips = True
            log.warning("%d of %d images could not be decoded and were left out of their batches (the log names them)",
                        skipped, loaded)

    def _same_rows_on_every_process(self, batch: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Trim every process's batch to the smallest one (rows dropped for undecodable images
        differ between processes): the gathers of the loss need equal rows, and a process that
        skipped a step alone would leave the others waiting forever. Returns (batch, rows trimmed)."""
        if self.world == 1:
            return batch, 0
        rows = len(batch["index"])
        common = dist_utils.all_reduce_min(rows)
        if common == rows:
            return batch, 0
        trimmed = {k: v[:common] if isinstance(v, (torch.Tensor, list)) and len(v) == rows else v
                   for k, v in batch.items() if k != "prepared"}  # the objective prepares trimmed rows itself
        return trimmed, rows - common

    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def fit(self) -> dict[str, Any]:
        """Train (or continue) the run; process 0 holds the run folder's lock until the run ends."""
        try:
            return self._fit()
        finally:
            if self.claim is not None:
                self.claim.release()
                self.claim = None

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self._prepare_run_folder()
        if cfg.init_from and cfg.resume is not None and not resumed:  # --resume auto on a new folder
            init_student(self.model, cfg.init_from, cfg.model)
        run_logs = None
        if self.claim is not None:
            sinks = parse_log_to(cfg.log_to, cfg.tensorboard)
            self.claim.files([*RUN_FILES]
                             + [f"{name}/" for name in ("tensorboard", "wandb") if name in sinks])
            record_settings(self.run_dir, cfg, self.step, self.resumed_changes)
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)  # steps after the checkpoint are trained again
            run_logs = RunLogs(self.run_dir, cfg.log_to, cfg.run_name or self.run_dir.resolve().name,
                               dataclasses.asdict(cfg), cfg.tensorboard)
        self._install_signal_handlers()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and dist_utils.is_main_process()),
                   desc=f"train {cfg.method}", unit="step", dynamic_ncols=True)
        undecodable = loaded = trimmed = trained_steps = 0
        t_last, samples_since = time.perf_counter(), 0
        try:
            while self.step < self.total_steps and self._stop_signal is None:
                epoch = self.epoch
                for batch in self._batches(epoch, self.batch_in_epoch):
                    self.batch_in_epoch += 1
                    undecodable += batch["n_skipped"]
                    loaded += batch["n_skipped"] + len(batch["index"])
                    self._check_skipped(undecodable, loaded)
                    batch, dropped = self._same_rows_on_every_process(batch)
                    trimmed += dropped
                    if len(batch["index"]) * self.world < 2:
                        self.step += 1  # nothing to contrast; keep the schedule aligned with data order
                        continue
                    result = self.train_step(batch)
                    trained_steps += 1
                    samples_since += len(batch["index"]) * self.world
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        record = {"step": self.step, "epoch": epoch, "loss": result.loss, **result.terms,
                                  "samples_per_s": samples_since / max(now - t_last, 1e-9), "skipped_images": undecodable + trimmed}
                        t_last, samples_since = now, 0
                        self._log(record, run_logs, bar)
                    if self.step % cfg.save_every == 0:
                        self.save()
                    if self.step >= self.total_steps or self._stop_signal is not None:
                        break
                else:
                    self.epoch, self.batch_in_epoch = epoch + 1, 0
        finally:
            bar.close()
            self._run_batches = None  # its loader workers end here
            if run_logs:
                run_logs.close()
        skipped = undecodable + trimmed
        if trained_steps == 0 and self.step >= self.total_steps and undecodable:
            raise ClipPingError(f"no step could be trained: {undecodable} of {loaded} images could not be decoded")
        path = self.save()
        stopped_by = self._stop_signal if self.step < self.total_steps else None  # a finished run is not "stopped"
        if stopped_by is not None:
            log.warning("stopped by %s at step %d; checkpoint %s. Resume with: clip-ping train --config %s --resume latest",
                        stopped_by, self.step, path, self.run_dir / "config.yaml")
        return {"step": self.step, "total_steps": self.total_steps, "stopped_by": stopped_by,
                "checkpoint": str(path) if path else None, "skipped_images": skipped}

    def _log(self, record: dict[str, Any], run_logs: RunLogs | None, bar) -> None:
        if run_logs is not None:
            run_logs.log(record)
        shown = {k.replace("loss_", ""): f"{record[k]:.3f}" for k in ("loss", "loss_clip", "loss_nn", "loss_xnn") if k in record}
        shown["sps"] = f"{record['samples_per_s']:.0f}"
        bar.set_postfix(shown, refresh=False)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run; returns a summary (steps done, checkpoint path, skips)."""
    with dist_utils.joined_process_group(dist_utils.resolve_device(cfg.device)):
        return Trainer(cfg).fit()
