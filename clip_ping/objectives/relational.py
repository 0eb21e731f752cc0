"""Relational distillation from the feature banks, as a control for CLIP-PING's neighbour form.

It pulls the student's in-batch similarity *distributions* toward the
teachers': for each image u_i, the softmax over the other images of the batch
of u_i . u_j / tau is matched (KL) to the same distribution of the teacher
image features a_i . a_j / tau; likewise captions with the text teacher.

    L = L_clip(u, v) + w * 1/2 [ KL(P(A_batch) || P(u)) + KL(P(B_batch) || P(v)) ]

Same teachers and same offline cost as CLIP-PING (the banks), but no
neighbours and no heads: comparing the two isolates whether the neighbour
form is what helps. Choices of this reading: one temperature tau for student
and teacher (default 0.1), each row's own similarity left out, the global
batch on every process, w = 1 by default.
"""

from __future__ import annotations

from typing import Any

import torch

from ..banks.format import FeatureBanks, open_banks
from ..model.losses import info_nce, relational_kl
from .base import Objective, ObjectiveSetup, StepContext

DEFAULT_WEIGHT = 1.0
DEFAULT_TEMPERATURE = 0.1


class RelationalObjective(Objective):
    name = "relational"

    def __init__(self, banks: FeatureBanks, weight: float = DEFAULT_WEIGHT, temperature: float = DEFAULT_TEMPERATURE,
                 local_loss: bool = False, duplicates: str = "none", caption_groups: torch.Tensor | None = None):
        super().__init__()
        self.banks, self.weight, self.temperature = banks, float(weight), float(temperature)
        self.local_loss, self.duplicates, self.caption_groups = local_loss, duplicates, caption_groups

    @classmethod
    def from_setup(cls, setup: ObjectiveSetup) -> "RelationalObjective":
        cfg = setup.cfg
        return cls(open_banks(setup.bank_dir, setup.table), DEFAULT_WEIGHT if cfg.peer_weight is None else cfg.peer_weight,
                   DEFAULT_TEMPERATURE if cfg.peer_temperature is None else cfg.peer_temperature,
                   cfg.local_loss, cfg.duplicate_captions, setup.caption_groups())

    @property
    def uses_banks(self) -> bool:
        return True

    def loss(self, u: torch.Tensor, v: torch.Tensor, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        loss_clip = info_nce(u, v, ctx.share(ctx.logit_scale), self.local_loss, self.groups_of(batch, u.device),
                             self.duplicates)
        a, b = self.banks.gather(batch["index"])
        loss_rel = (relational_kl(u, a.to(u.device), self.temperature)
                    + relational_kl(v, b.to(u.device), self.temperature)) / 2
        return {"loss": loss_clip + self.weight * loss_rel, "loss_clip": loss_clip.detach(),
                "loss_relational": loss_rel.detach()}
