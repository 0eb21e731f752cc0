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

from ..banks.format import FeatureBanks, open_banks
from ..knn import NeighborQueue
from ..model.heads import NeighborGuidance
from ..model.losses import ClipPingLoss
from .base import Objective, ObjectiveSetup, StepContext
from .sources import DatasetNeighbors, NeighborSource, PrefetchNeighborRows, QueueNeighbors
from .targets import StudentTableTargets, StudentTargets, TeacherTargets

MAX_LOGIT_SCALE = 100.0
Targets = TeacherTargets | StudentTargets | StudentTableTargets


def pair_xnn_through_other_modality(found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``--xnn-pairing other``: u_i is pulled to the caption of q_i and v_i to the image of p_i.
    Those are exactly the NN targets of the other side, so no new target is computed."""
    return {**found, "xnn_image": found["nn_text"], "xnn_text": found["nn_image"]}


def make_heads(setup: ObjectiveSetup, banks: FeatureBanks) -> NeighborGuidance:
    """h_A, h_B (and per-term scales) on the setup's device, from a generator of their own:
    the student's initial weights do not depend on the method, and every method gets the same heads."""
    cfg = setup.cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        heads = NeighborGuidance(banks.image_dim, banks.text_dim, setup.embed_dim,
                                 kind=cfg.head, per_term_scales=cfg.logit_scales == "per_term")
    return heads.to(setup.device)


class ClipPingObjective(Objective):
    name = "clip-ping"
    weighs_neighbor_terms = True

    def __init__(self, banks: FeatureBanks, source: NeighborSource, heads: NeighborGuidance,
                 targets: Targets, lambda_nn: float = 0.5, lambda_xnn: float = 0.5,
                 local_loss: bool = False, duplicates: str = "none", caption_groups: torch.Tensor | None = None,
                 xnn_pairing: str = "own", collisions: str = "leave"):
        super().__init__()
        self.banks, self.source, self.targets = banks, source, targets
        self.heads = heads  # h_A, h_B and the optional per-term logit scales: the learnable part
        self.criterion = ClipPingLoss(lambda_nn, lambda_xnn, local_loss=local_loss, duplicates=duplicates,
                                      collisions=collisions)
        self.caption_groups = caption_groups
        self.xnn_pairing = xnn_pairing

    @classmethod
    def from_setup(cls, setup: ObjectiveSetup) -> "ClipPingObjective":
        cfg = setup.cfg
        bank_dir = setup.bank_dir
        banks = open_banks(bank_dir, setup.table)
        source: NeighborSource
        if cfg.neighbor_source == "dataset":
            source = DatasetNeighbors.open(bank_dir, banks, cfg.neighbor_topk, cfg.seed)
        else:
            source = QueueNeighbors(NeighborQueue(cfg.queue_size, banks.image_dim, banks.text_dim, device=setup.device),
                                    banks)
        heads = make_heads(setup, banks)
        targets: Targets
        if cfg.targets == "student":
            # with queue neighbours, the neighbours are recent, so their stored embeddings are fresh
            targets = StudentTargets(len(setup.table), setup.embed_dim)
        elif cfg.targets == "student_table":
            targets = StudentTableTargets(len(setup.table), setup.embed_dim, TeacherTargets(banks, heads))
        else:
            targets = TeacherTargets(banks, heads)
        return cls(banks, source, heads, targets, *cfg.neighbor_weights, **cls._common_options(setup))

    @staticmethod
    def _common_options(setup: ObjectiveSetup) -> dict[str, Any]:
        cfg = setup.cfg
        return {"local_loss": cfg.local_loss, "duplicates": cfg.duplicate_captions,
                "caption_groups": setup.caption_groups(), "xnn_pairing": cfg.xnn_pairing,
                "collisions": cfg.collisions}

    @property
    def uses_banks(self) -> bool:
        return True

    @property
    def has_unused_parameters(self) -> bool:
        # the heads carry no target with student targets; with the table they always do (the
        # teacher fallback is in the graph, its gradient zero on rows already seen)
        return isinstance(self.targets, StudentTargets)

    def batch_preparer(self) -> PrefetchNeighborRows | None:
        """With data-set neighbours and bank rows to read, the loader workers pick p, q and read their rows."""
        if isinstance(self.source, DatasetNeighbors) and isinstance(self.targets, (TeacherTargets, StudentTableTargets)):
            return PrefetchNeighborRows(str(self.banks.path), self.banks.fingerprint(), self.source.top_k,
                                        self.source.seed)
        return None

    def neighbours(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """(p, q, their bank rows or None): from the loader's preparation when it is this step's, else picked now."""
        index, prepared = batch["index"], batch.get("prepared")
        if prepared is not None and prepared["step"] == step and torch.equal(prepared["index"], index):
            return prepared["p"], prepared["q"], prepared["rows"]
        return *self.source.pick(index, step), None

    def loss(self, u: torch.Tensor, v: torch.Tensor, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        index = batch["index"]
        p, q, rows = self.neighbours(batch, ctx.step)
        found = self.targets(index, u, v, p, q, rows)
        return self.guided_loss(u, v, batch, ctx, found, p, q)

    def guided_loss(self, u: torch.Tensor, v: torch.Tensor, batch: dict[str, Any], ctx: StepContext,
                    found: dict[str, torch.Tensor], p: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """The CLIP-PING loss for the four targets ``found`` of neighbours p, q (any target provider)."""
        target_ids = {"nn_image": p, "xnn_image": p, "nn_text": q, "xnn_text": q}
        if self.xnn_pairing == "other":
            found = pair_xnn_through_other_modality(found)
            target_ids = pair_xnn_through_other_modality(target_ids)
        targets = {k: ctx.share(t.float()) for k, t in found.items()}
        scales = {}
        if self.heads.logit_scale_nn is not None:
            scales = {"logit_scale_nn": ctx.share(self.heads.logit_scale_nn.exp()),
                      "logit_scale_xnn": ctx.share(self.heads.logit_scale_xnn.exp())}
        return self.criterion(u, v, ctx.share(ctx.logit_scale), targets=targets, groups=self.groups_of(batch, u.device),
                              index=batch["index"], target_ids=target_ids, **scales)

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
