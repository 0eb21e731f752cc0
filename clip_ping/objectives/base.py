"""What every training method implements: the `Objective` interface.

The trainer knows a loop, a schedule, checkpoints and one objective. An
objective is a small `nn.Module` that owns everything its method adds beside
the student (heads, feature banks, neighbour source, memories) and turns a
batch of student embeddings into a loss. Its learnable parameters are
optimised with the student's; its state (parameters and any queue or memory,
through ``get_extra_state``) goes into the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from ..data.table import PairSource


class ObjectiveSettings(Protocol):
    """The options of a run that objectives read: the training config (`clip_ping.training.TrainConfig`)
    fits this shape, so objectives sit below training and never import it."""

    data: str
    banks: str | None
    method: str
    seed: int
    batch_size: int
    accum_steps: int
    local_loss: bool
    neighbor_topk: int
    neighbor_source: str
    queue_size: int
    teacher_image_size: int | None
    teacher_compile: str
    targets: str
    xnn_pairing: str
    collisions: str
    peer_weight: float | None
    peer_temperature: float | None
    head: str
    logit_scales: str
    duplicate_captions: str

    @property
    def neighbor_weights(self) -> tuple[float, float]: ...

    def total_steps(self, n_pairs: int) -> int: ...


@dataclass
class StepContext:
    """What a loss needs from the trainer at one step.

    ``logit_scale`` is the student's (already exponentiated). ``grad_share``
    scales the gradient, not the value, of tensors every micro-batch of a
    gradient-accumulation step uses, so the micro-batches sum to the full gradient.
    """

    step: int
    logit_scale: torch.Tensor
    grad_share: float = 1.0
    #: normalised student embeddings (B x d) of the extra image views the objective asked for (`view_transforms`)
    views: tuple[torch.Tensor, ...] = ()

    def share(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.grad_share == 1.0 else t.detach() + (t - t.detach()) * self.grad_share


@dataclass
class ObjectiveSetup:
    """What an objective is built from: the run's config, its training table and student."""

    cfg: ObjectiveSettings
    table: PairSource
    embed_dim: int
    device: torch.device
    #: the student's training transform (PIL image -> augmented view), for methods that load or convert views
    image_transform: Callable[..., torch.Tensor] | None = None

    def caption_groups(self) -> torch.Tensor | None:
        """Per sample, the id of its caption text (identical captions share one), when the
        config asks the CLIP term to treat duplicates specially (``duplicate_captions``)."""
        if self.cfg.duplicate_captions == "none":
            return None
        from ..data.pairs import caption_ids

        return caption_ids(self.table.captions)

    @property
    def bank_dir(self) -> Path:
        """The feature banks of the run: ``--banks``, else ``<data>/banks``."""
        if self.cfg.banks:
            return Path(self.cfg.banks)
        data = Path(self.cfg.data)
        return (data if data.is_dir() else data.parent) / "banks"


class Objective(nn.Module):
    """One training method. Subclasses implement `loss`; the rest is optional."""

    #: the ``--method`` name it is registered under
    name: str = ""
    #: whether the method has NN/XNN terms weighed by ``lambda_nn`` / ``lambda_xnn``
    weighs_neighbor_terms: bool = False
    #: per sample, its caption group (``ObjectiveSetup.caption_groups``), or None
    caption_groups: torch.Tensor | None = None

    def groups_of(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor | None:
        """The caption groups of a batch's rows, for the duplicate rule of the CLIP term."""
        if self.caption_groups is None:
            return None
        return self.caption_groups[batch["index"].cpu()].to(device)

    @classmethod
    def from_setup(cls, setup: ObjectiveSetup) -> "Objective":
        """The objective of a run: built from its config, training table and student."""
        raise NotImplementedError

    def loss(self, u: torch.Tensor, v: torch.Tensor, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """``{"loss": what to backpropagate, "loss_<term>": each term, detached}`` for
        normalised student image embeddings ``u`` and text embeddings ``v`` (B x d)
        of the batch's rows (``batch["index"]``: their sample indices)."""
        raise NotImplementedError

    def after_step(self, batch: dict[str, Any]) -> None:
        """Called once after each optimiser step (clamp own scales, update queues)."""

    def view_transforms(self, student_transform: Callable[..., torch.Tensor]) -> tuple[Callable[..., torch.Tensor], ...]:
        """Transforms of extra augmented views of each image that the loader must provide (seeded
        like the main view, so a resumed run sees the same ones); their student embeddings reach
        `loss` as ``ctx.views``. Empty: the student's one view is enough."""
        return ()

    def batch_preparer(self) -> Callable[[torch.Tensor, int], dict[str, Any]] | None:
        """Work on a batch that needs no model state, done in the loader workers so it stays
        off the training step's critical path: a picklable ``fn(index, step) -> dict``
        whose result reaches `loss` as ``batch["prepared"]``. None: nothing to prepare."""
        return None

    @property
    def has_unused_parameters(self) -> bool:
        """True when some parameters may get no gradient in a step (DDP must then look for them)."""
        return False

    @property
    def uses_banks(self) -> bool:
        """Whether the method reads teacher feature banks (they must exist before training)."""
        return False
