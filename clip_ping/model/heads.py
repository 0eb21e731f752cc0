"""Guidance heads: carry frozen teacher features into the student's space.

``h_A: R^{d_a} -> R^d`` (image teacher) and ``h_B: R^{d_b} -> R^d`` (text
teacher), a small MLP by default (TrainConfig.head) or linear (METHOD.md [choice]); outputs are
L2-normalised. With ``scale_mode="per_term"`` the NN and XNN terms get their
own learnable logit scales, kept here so the student model stays a plain
open_clip model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _make_head(d_in: int, d_out: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp":
        hidden = max(d_out, min(d_in, 4 * d_out))
        return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    raise ValueError(f"unknown head kind '{kind}' (linear or mlp)")


class NeighborGuidance(nn.Module):
    """The learnable parts of CLIP-PING beside the student: h_A, h_B, optional scales."""

    def __init__(self, image_teacher_dim: int, text_teacher_dim: int, embed_dim: int,
                 kind: str = "linear", per_term_scales: bool = False, init_logit_scale: float = 1 / 0.07):
        super().__init__()
        self.image_head = _make_head(image_teacher_dim, embed_dim, kind)
        self.text_head = _make_head(text_teacher_dim, embed_dim, kind)
        self.logit_scale_nn: nn.Parameter | None
        self.logit_scale_xnn: nn.Parameter | None
        if per_term_scales:
            init = math.log(init_logit_scale)
            self.logit_scale_nn = nn.Parameter(torch.tensor(init))
            self.logit_scale_xnn = nn.Parameter(torch.tensor(init))
        else:
            self.logit_scale_nn = self.logit_scale_xnn = None

    def project_image(self, a: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(a), dim=-1)

    def project_text(self, b: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(b), dim=-1)

    def targets(self, image_of_p: torch.Tensor, text_of_p: torch.Tensor,
                image_of_q: torch.Tensor, text_of_q: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four targets of METHOD.md for a batch.

        p is the image-side neighbour (found among teacher image features),
        q the text-side neighbour (found among teacher text features).
        """
        return {
            "nn_image": self.project_image(image_of_p),   # u_i  <-> h_A(a_{p_i})
            "xnn_image": self.project_text(text_of_p),    # u_i  <-> h_B(b_{p_i})
            "nn_text": self.project_text(text_of_q),      # v_i  <-> h_B(b_{q_i})
            "xnn_text": self.project_image(image_of_q),   # v_i  <-> h_A(a_{q_i})
        }
