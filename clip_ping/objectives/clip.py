"""Plain CLIP: the symmetric InfoNCE of image and text embeddings, the baseline of every comparison."""

from __future__ import annotations

from typing import Any

import torch

from ..model.losses import info_nce
from .base import Objective, ObjectiveSetup, StepContext


class ClipObjective(Objective):
    name = "clip"

    def __init__(self, local_loss: bool = False, duplicates: str = "none", caption_groups: torch.Tensor | None = None):
        super().__init__()
        self.local_loss, self.duplicates, self.caption_groups = local_loss, duplicates, caption_groups

    @classmethod
    def from_setup(cls, setup: ObjectiveSetup) -> "ClipObjective":
        return cls(setup.cfg.local_loss, setup.cfg.duplicate_captions, setup.caption_groups())

    def loss(self, u: torch.Tensor, v: torch.Tensor, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        loss_clip = info_nce(u, v, ctx.share(ctx.logit_scale), self.local_loss, self.groups_of(batch, u.device),
                             self.duplicates)
        return {"loss": loss_clip, "loss_clip": loss_clip.detach()}
