"""CLIP-PING: the CLIP loss plus contrastive guidance from each row's nearest
neighbour (NN) and cross nearest neighbour (XNN), as in METHOD.md.

It is assembled from three parts, each with one job: a neighbour source (the
precomputed data-set table, or a FIFO queue), a target provider (teacher
features through the heads, or the student's stored embeddings) and the loss
`ClipPingLoss`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..banks import FeatureBanks, open_banks
from ..errors import ConfigError
from ..heads import NeighborGuidance
from ..losses import ClipPingLoss
from ..neighbors import NeighborQueue, load_neighbors
from .base import Objective, ObjectiveSetup, StepContext
from .sources import DatasetNeighbors, NeighborSource, PrefetchNeighborRows, QueueNeighbors
from .targets import StudentTargets, TeacherTargets

MAX_LOGIT_SCALE = 100.0


class ClipPingObjective(Objective):
    name = "clip-ping"

    def __init__(self, banks: FeatureBanks, source: NeighborSource, heads: NeighborGuidance,
                 targets: TeacherTargets | StudentTargets, lambda_nn: float = 0.5, lambda_xnn: float = 0.5,
                 local_loss: bool = False, duplicates: str = "none", caption_groups: torch.Tensor | None = None):
        super().__init__()
        self.banks, self.source, self.targets = banks, source, targets
        self.heads = heads  # h_A, h_B and the optional per-term logit scales: the learnable part
        self.criterion = ClipPingLoss(lambda_nn, lambda_xnn, local_loss=local_loss, duplicates=duplicates)
        self.caption_groups = caption_groups

    @classmethod
    def from_setup(cls, setup: ObjectiveSetup) -> "ClipPingObjective":
        cfg = setup.cfg
        bank_dir = setup.bank_dir
        banks = open_banks(bank_dir, setup.table)
        source: NeighborSource
        if cfg.neighbor_source == "dataset":
            table = load_neighbors(bank_dir, expected_fingerprint=banks.fingerprint())
            if cfg.neighbor_topk > table.k:
                raise ConfigError(f"config key 'neighbor_topk': {cfg.neighbor_topk} exceeds the k={table.k} "
                                  f"neighbours stored in {bank_dir}; re-run clip-ping neighbors with a larger --k")
            source = DatasetNeighbors(table, cfg.neighbor_topk, cfg.seed)
        else:
            source = QueueNeighbors(NeighborQueue(cfg.queue_size, banks.image_dim, banks.text_dim), banks)
        # a generator of its own: the student's initial weights do not depend on the method
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            heads = NeighborGuidance(banks.image_dim, banks.text_dim, setup.embed_dim,
                                     kind=cfg.head, per_term_scales=cfg.logit_scales == "per_term")
        heads.to(setup.device)
        targets: TeacherTargets | StudentTargets
        if cfg.targets == "student":
            # with queue neighbours, the neighbours are recent, so their stored embeddings are fresh
            targets = StudentTargets(len(setup.table), setup.embed_dim)
        else:
            targets = TeacherTargets(banks, heads)
        lambda_nn, lambda_xnn = cfg.effective_lambdas
        return cls(banks, source, heads, targets, lambda_nn, lambda_xnn, cfg.local_loss, cfg.duplicate_captions,
                   setup.caption_groups())

    @property
    def uses_banks(self) -> bool:
        return True

    @property
    def has_unused_parameters(self) -> bool:
        return isinstance(self.targets, StudentTargets)  # the heads then carry no target

    def batch_preparer(self) -> PrefetchNeighborRows | None:
        """With data-set neighbours and teacher targets, the loader workers pick p, q and read their rows."""
        if isinstance(self.source, DatasetNeighbors) and isinstance(self.targets, TeacherTargets):
            return PrefetchNeighborRows(str(self.banks.path), self.banks.fingerprint(), self.source.top_k,
                                        self.source.seed)
        return None

    def loss(self, u: torch.Tensor, v: torch.Tensor, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        index = batch["index"]
        prepared = batch.get("prepared")
        if (prepared is not None and prepared["step"] == ctx.step and torch.equal(prepared["index"], index)
                and isinstance(self.targets, TeacherTargets)):
            found = self.targets.from_rows(*prepared["rows"], device=u.device)
        else:
            p, q = self.source.pick(index, ctx.step)
            found = self.targets(index, u, v, p, q)
        targets = {k: ctx.share(t.float()) for k, t in found.items()}
        scales = {}
        if self.heads.logit_scale_nn is not None:
            scales = {"logit_scale_nn": ctx.share(self.heads.logit_scale_nn.exp()),
                      "logit_scale_xnn": ctx.share(self.heads.logit_scale_xnn.exp())}
        return self.criterion(u, v, ctx.share(ctx.logit_scale), targets=targets, groups=self.groups_of(batch, u.device),
                              **scales)

    @torch.no_grad()
    def after_step(self, batch: dict[str, Any]) -> None:
        if self.heads.logit_scale_nn is not None:
            self.heads.logit_scale_nn.clamp_(max=math.log(MAX_LOGIT_SCALE))
            self.heads.logit_scale_xnn.clamp_(max=math.log(MAX_LOGIT_SCALE))
        self.source.after_step(batch["index"])

    # the queue and the student memory are saved with the heads
    def get_extra_state(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "targets": self.targets.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state.get("source"))
        self.targets.load_state_dict(state.get("targets"))
