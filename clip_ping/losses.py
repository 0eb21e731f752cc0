"""Contrastive losses of CLIP-PING.

    L = L_clip(u, v)
      + lambda_nn  * 1/2 [ L_nce(u, h_A(A[p])) + L_nce(v, h_B(B[q])) ]
      + lambda_xnn * 1/2 [ L_nce(u, h_B(B[p])) + L_nce(v, h_A(A[q])) ]

Every term is CLIP's symmetric InfoNCE. With several processes, all inputs are
gathered (with gradients) so each term contrasts the global batch; with
``local_loss`` each process scores only its own rows against the global batch,
as open_clip does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_ints, gather_with_grad, rank_and_world

DUPLICATE_RULES = ("none", "mask", "positives")


def info_nce(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, local_loss: bool = False,
             groups: torch.Tensor | None = None, duplicates: str = "none") -> torch.Tensor:
    """Symmetric InfoNCE ``1/2 [CE(s x y^T, I) + CE(s y x^T, I)]``; row i of x pairs with row i of y.

    ``groups`` (LongTensor B, optional) marks rows that are duplicates of each other
    (e.g. identical captions). ``duplicates`` says what they are to each other:
    ``none``, negatives as in CLIP; ``mask``, neither negatives nor positives (left
    out of the softmax); ``positives``, extra positives: the loss of a row is the
    mean of ``-log p`` over all columns of its group (multi-positive InfoNCE).
    """
    if duplicates not in DUPLICATE_RULES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_RULES}, got {duplicates!r}")
    rank, world = rank_and_world()
    rows_groups = col_groups = groups
    if world > 1:
        all_x, all_y = gather_with_grad(x), gather_with_grad(y)
        if groups is not None and duplicates != "none":
            col_groups = gather_ints(groups)
        if local_loss:
            logits_xy = logit_scale * x @ all_y.T
            logits_yx = logit_scale * y @ all_x.T
            labels = torch.arange(x.shape[0], device=x.device) + rank * x.shape[0]
            return _symmetric(logits_xy, logits_yx, labels, rows_groups, col_groups, duplicates)
        x, y, rows_groups = all_x, all_y, col_groups
    # both directions as separate matmuls (not a transpose), as open_clip does,
    # so plain CLIP here is bitwise the same computation as open_clip's ClipLoss
    logits_xy = logit_scale * x @ y.T
    logits_yx = logit_scale * y @ x.T
    labels = torch.arange(x.shape[0], device=x.device)
    return _symmetric(logits_xy, logits_yx, labels, rows_groups, col_groups, duplicates)


def _symmetric(logits_xy: torch.Tensor, logits_yx: torch.Tensor, labels: torch.Tensor,
               row_groups: torch.Tensor | None, col_groups: torch.Tensor | None, duplicates: str) -> torch.Tensor:
    if row_groups is None or col_groups is None or duplicates == "none":
        return (F.cross_entropy(logits_xy, labels) + F.cross_entropy(logits_yx, labels)) / 2
    same = row_groups.to(labels.device)[:, None] == col_groups.to(labels.device)[None, :]
    return (_with_duplicates(logits_xy, labels, same, duplicates)
            + _with_duplicates(logits_yx, labels, same, duplicates)) / 2


def _with_duplicates(logits: torch.Tensor, labels: torch.Tensor, same: torch.Tensor, duplicates: str) -> torch.Tensor:
    own = F.one_hot(labels, logits.shape[1]).bool()
    if duplicates == "mask":
        return F.cross_entropy(logits.masked_fill(same & ~own, float("-inf")), labels)
    log_p = F.log_softmax(logits, dim=1)
    return -((log_p * same).sum(dim=1) / same.sum(dim=1)).mean()


class ClipPingLoss(nn.Module):
    """CLIP loss plus NN and XNN guidance; plain CLIP when both lambdas are 0.

    ``forward`` returns a dict: ``loss`` (what to backpropagate) and each
    term (``loss_clip``, ``loss_nn``, ``loss_xnn``) detached for logging.
    """

    def __init__(self, lambda_nn: float = 0.5, lambda_xnn: float = 0.5, local_loss: bool = False,
                 duplicates: str = "none"):
        super().__init__()
        self.lambda_nn = float(lambda_nn)
        self.lambda_xnn = float(lambda_xnn)
        self.local_loss = local_loss
        self.duplicates = duplicates  # rule for rows with identical captions, in the CLIP term

    @property
    def uses_neighbors(self) -> bool:
        return self.lambda_nn != 0 or self.lambda_xnn != 0

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                targets: dict[str, torch.Tensor] | None = None,
                logit_scale_nn: torch.Tensor | None = None,
                logit_scale_xnn: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        u, v = image_features, text_features
        loss_clip = info_nce(u, v, logit_scale, self.local_loss, groups, self.duplicates)
        out = {"loss": loss_clip, "loss_clip": loss_clip.detach()}
        if not self.uses_neighbors:
            return out
        if targets is None:
            raise ValueError("CLIP-PING terms need neighbour targets")
        s_nn = logit_scale if logit_scale_nn is None else logit_scale_nn
        s_xnn = logit_scale if logit_scale_xnn is None else logit_scale_xnn
        loss = loss_clip
        if self.lambda_nn != 0:
            loss_nn = (info_nce(u, targets["nn_image"], s_nn, self.local_loss)
                       + info_nce(v, targets["nn_text"], s_nn, self.local_loss)) / 2
            loss = loss + self.lambda_nn * loss_nn
            out["loss_nn"] = loss_nn.detach()
        if self.lambda_xnn != 0:
            loss_xnn = (info_nce(u, targets["xnn_image"], s_xnn, self.local_loss)
                        + info_nce(v, targets["xnn_text"], s_xnn, self.local_loss)) / 2
            loss = loss + self.lambda_xnn * loss_xnn
            out["loss_xnn"] = loss_xnn.detach()
        out["loss"] = loss
        return out
