"""SLIP (Mu et al., ECCV 2022), as a peer of CLIP-PING: an image-only SimCLR term beside the CLIP loss.

It pulls two SimCLR-augmented views of the same image toward each other (and
away from every other view of the global batch), through a projector MLP on
the student's image embeddings. No teacher and no offline stage.

    L = L_clip(u, v) + w * NT-Xent(g(f_I(x'_1)), g(f_I(x'_2)); tau)

As in SLIP, the two SimCLR views are extra views beside the CLIP view (so each
step runs the image tower on three views), w = 1 and tau = 0.1 by default.
Choices of this reading: the projector reads the student's normalised image
embedding (open_clip's tower output; SLIP reads the trunk's pooled feature)
and has no batch norm (so one process and several compute the same); the
views use the student's resolution and normalisation. The loader draws the
views right after the CLIP view from the same per-sample seed, so a resumed
run sees the same ones.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..model.losses import info_nce, nt_xent
from .base import Objective, ObjectiveSetup, StepContext
from .views import simclr_view_transform

DEFAULT_WEIGHT = 1.0
DEFAULT_TEMPERATURE = 0.1


class SlipObjective(Objective):
    name = "slip"

    def __init__(self, embed_dim: int, weight: float = DEFAULT_WEIGHT, temperature: float = DEFAULT_TEMPERATURE,
                 local_loss: bool = False, duplicates: str = "none", caption_groups: torch.Tensor | None = None):
        super().__init__()
        hidden = 4 * embed_dim
        self.projector = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                       nn.Linear(hidden, embed_dim))
        self.weight, self.temperature = float(weight), float(temperature)
        self.local_loss, self.duplicates, self.caption_groups = local_loss, duplicates, caption_groups

    @classmethod
    def from_setup(cls, setup: ObjectiveSetup) -> "SlipObjective":
        cfg = setup.cfg
        if cfg.accum_steps > 1:
            raise ConfigError("config key 'accum_steps': --method slip trains whole batches only (accum_steps 1)")
        with torch.random.fork_rng(devices=[]):  # the student's initial weights do not depend on the method
            torch.manual_seed(cfg.seed + 1)
            objective = cls(setup.embed_dim, DEFAULT_WEIGHT if cfg.peer_weight is None else cfg.peer_weight,
                            DEFAULT_TEMPERATURE if cfg.peer_temperature is None else cfg.peer_temperature,
                            cfg.local_loss, cfg.duplicate_captions, setup.caption_groups())
        return objective.to(setup.device)

    def view_transforms(self, student_transform: Callable[..., torch.Tensor]) -> tuple[Callable[..., torch.Tensor], ...]:
        view = simclr_view_transform(student_transform)
        return (view, view)

    def loss(self, u: torch.Tensor, v: torch.Tensor, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        if len(ctx.views) != 2:
            raise ValueError("SLIP needs the embeddings of two extra views of each image (ctx.views)")
        loss_clip = info_nce(u, v, ctx.share(ctx.logit_scale), self.local_loss, self.groups_of(batch, u.device),
                             self.duplicates)
        loss_ssl = nt_xent(self.projector(ctx.views[0]), self.projector(ctx.views[1]), self.temperature)
        return {"loss": loss_clip + self.weight * loss_ssl, "loss_clip": loss_clip.detach(), "loss_ssl": loss_ssl.detach()}
