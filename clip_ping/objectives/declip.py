"""DeCLIP's nearest-neighbour supervision (NNS; Li et al., ICLR 2022), as a peer of CLIP-PING.

It pulls each image u_i toward the nearest *text* among a FIFO queue of the
student's own recent text embeddings, the neighbour found by the row's own
text embedding v_i. No teacher and no offline stage: the neighbours come from
the student itself.

    L = L_clip(u, v) + w * CE(s u T'^T, I),   T'_i = argmax_{t in queue} v_i . t

The term is one-directional (image to neighbour text), with CLIP's learnable
scale s, as in DeCLIP. Choices of this reading: the queue never offers a row
its own earlier text (the neighbour is another pair's; a row with no other
candidate keeps its own current text, detached); the term is absent until the
queue holds anything (the first step); w defaults to 0.25, DeCLIP's 0.8 : 0.2
ratio of the CLIP and NNS terms. The queue (texts and their sample indices) is
in the checkpoint; every process pushes the global batch, so all hold the same.
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import gather_rows
from ..errors import ConfigError
from ..model.losses import info_nce, one_way_nce
from .base import Objective, ObjectiveSetup, StepContext

DEFAULT_WEIGHT = 0.25


class TextQueue:
    """A FIFO of recent (detached, normalised) student text embeddings and their sample indices."""

    def __init__(self, size: int, dim: int):
        if size < 1:
            raise ConfigError(f"config key 'queue_size' must be at least 1, got {size}")
        self.texts = torch.zeros(size, dim)
        self.indices = torch.full((size,), -1, dtype=torch.int64)  # -1: empty slot
        self.ptr = 0

    def __len__(self) -> int:
        return int((self.indices >= 0).sum())

    @torch.no_grad()
    def push(self, index: torch.Tensor, texts: torch.Tensor) -> None:
        size = len(self.indices)
        index, texts = index.cpu()[-size:], texts.detach().float().cpu()[-size:]
        slots = (self.ptr + torch.arange(len(index))) % size
        self.texts[slots], self.indices[slots] = texts, index
        self.ptr = int((self.ptr + len(index)) % size)

    @torch.no_grad()
    def nearest(self, index: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per row, the queued text most similar to ``v`` from another sample (B x d, on v's device)."""
        scores = v.detach().float().cpu() @ self.texts.T
        scores.masked_fill_((self.indices[None, :] < 0) | (self.indices[None, :] == index.cpu()[:, None]), float("-inf"))
        best_s, best = scores.max(dim=1)
        found = self.texts[best].to(v.device)
        return torch.where(torch.isinf(best_s)[:, None].to(v.device), v.detach().float(), found)

    def state_dict(self) -> dict[str, Any]:
        return {"texts": self.texts.clone(), "indices": self.indices.clone(), "ptr": self.ptr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["texts"].shape) != tuple(self.texts.shape):
            raise ConfigError("the checkpoint's text queue has another size or dimension than this run (queue_size)")
        self.texts.copy_(state["texts"])
        self.indices.copy_(state["indices"])
        self.ptr = int(state["ptr"])


class DeclipNnsObjective(Objective):
    name = "declip-nns"

    def __init__(self, queue_size: int, embed_dim: int, weight: float = DEFAULT_WEIGHT, local_loss: bool = False,
                 duplicates: str = "none", caption_groups: torch.Tensor | None = None):
        super().__init__()
        self.queue = TextQueue(queue_size, embed_dim)
        self.weight, self.local_loss, self.duplicates = float(weight), local_loss, duplicates
        self.caption_groups = caption_groups
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's texts, pushed after it

    @classmethod
    def from_setup(cls, setup: ObjectiveSetup) -> "DeclipNnsObjective":
        cfg = setup.cfg
        weight = DEFAULT_WEIGHT if cfg.peer_weight is None else cfg.peer_weight
        return cls(cfg.queue_size, setup.embed_dim, weight, cfg.local_loss, cfg.duplicate_captions,
                   setup.caption_groups())

    def loss(self, u: torch.Tensor, v: torch.Tensor, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        index = batch["index"]
        scale = ctx.share(ctx.logit_scale)
        loss_clip = info_nce(u, v, scale, self.local_loss, self.groups_of(batch, u.device), self.duplicates)
        out = {"loss": loss_clip, "loss_clip": loss_clip.detach()}
        self._pending = (gather_rows(index.cpu()), gather_rows(v.detach().float()).cpu())
        if len(self.queue) > 0 and self.weight != 0:
            loss_nns = one_way_nce(u, self.queue.nearest(index, v), scale, self.local_loss)
            out["loss"] = loss_clip + self.weight * loss_nns
            out["loss_nns"] = loss_nns.detach()
        return out

    def after_step(self, batch: dict[str, Any]) -> None:
        if self._pending is not None:
            self.queue.push(*self._pending)
            self._pending = None

    def get_extra_state(self) -> dict[str, Any]:
        return {"queue": self.queue.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state and state.get("queue") is not None:
            self.queue.load_state_dict(state["queue"])
