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

from ..distributed import gather_ints, gather_with_grad, rank_and_world

DUPLICATE_RULES = ("none", "mask", "positives")


def info_nce(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, local_loss: bool = False,
             groups: torch.Tensor | None = None, duplicates: str = "none",
             collisions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Symmetric InfoNCE ``1/2 [CE(s x y^T, I) + CE(s y x^T, I)]``; row i of x pairs with row i of y.

    ``groups`` (LongTensor B, optional) marks rows that are duplicates of each other
    (e.g. identical captions). ``duplicates`` says what they are to each other:
    ``none``, negatives as in CLIP; ``mask``, neither negatives nor positives (left
    out of the softmax); ``positives``, extra positives: the loss of a row is the
    mean of ``-log p`` over all columns of its group (multi-positive InfoNCE).

    ``collisions`` = (own, of), two LongTensors B: the sample each x row is, and the
    sample its y row stems from (a neighbour's target). A y column is then a false
    negative of an x row when both stem from the same sample (``of_r == of_c``) or
    when it stems from the row's own sample (``own_r == of_c``); ``duplicates``
    says what such columns are, as for ``groups``.
    """
    if duplicates not in DUPLICATE_RULES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_RULES}, got {duplicates!r}")
    rank, world = rank_and_world()
    related = duplicates != "none" and (groups is not None or collisions is not None)
    rows_ids = col_ids = groups if collisions is None else torch.stack(collisions)
    if world > 1:
        all_x, all_y = gather_with_grad(x), gather_with_grad(y)
        if related and rows_ids is not None:
            col_ids = gather_ints(rows_ids) if collisions is None else gather_ints(rows_ids.T).T  # (own, of) by row
        if local_loss:
            logits_xy = logit_scale * x @ all_y.T
            logits_yx = logit_scale * y @ all_x.T
            labels = torch.arange(x.shape[0], device=x.device) + rank * x.shape[0]
            return _symmetric(logits_xy, logits_yx, labels, *_related(rows_ids, col_ids, related, collisions is not None),
                              duplicates)
        x, y, rows_ids = all_x, all_y, col_ids
    # both directions as separate matmuls (not a transpose), as open_clip does,
    # so plain CLIP here is bitwise the same computation as open_clip's ClipLoss
    logits_xy = logit_scale * x @ y.T
    logits_yx = logit_scale * y @ x.T
    labels = torch.arange(x.shape[0], device=x.device)
    return _symmetric(logits_xy, logits_yx, labels, *_related(rows_ids, col_ids, related, collisions is not None),
                      duplicates)


def _related(rows: torch.Tensor | None, cols: torch.Tensor | None, related: bool, collisions: bool
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (x->y, y->x) matrices of columns related to each row: same caption group, or colliding targets."""
    if not related or rows is None or cols is None:
        return None, None
    if not collisions:
        same = rows[:, None] == cols[None, :]
        return same, same
    (own_r, of_r), (own_c, of_c) = rows, cols
    same_target = of_r[:, None] == of_c[None, :]
    return same_target | (own_r[:, None] == of_c[None, :]), same_target | (of_r[:, None] == own_c[None, :])


def _symmetric(logits_xy: torch.Tensor, logits_yx: torch.Tensor, labels: torch.Tensor,
               same_xy: torch.Tensor | None, same_yx: torch.Tensor | None, duplicates: str) -> torch.Tensor:
    if same_xy is None or same_yx is None or duplicates == "none":
        return (F.cross_entropy(logits_xy, labels) + F.cross_entropy(logits_yx, labels)) / 2
    return (_with_duplicates(logits_xy, labels, same_xy.to(labels.device), duplicates)
            + _with_duplicates(logits_yx, labels, same_yx.to(labels.device), duplicates)) / 2


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
                 duplicates: str = "none", collisions: str = "leave"):
        super().__init__()
        self.lambda_nn = float(lambda_nn)
        self.lambda_xnn = float(lambda_xnn)
        self.local_loss = local_loss
        self.duplicates = duplicates  # rule for rows with identical captions, in the CLIP term
        # rule for colliding neighbour targets in the NN/XNN terms (`info_nce`'s ``collisions``)
        self.collisions = "none" if collisions == "leave" else collisions

    @property
    def uses_neighbors(self) -> bool:
        return self.lambda_nn != 0 or self.lambda_xnn != 0

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                targets: dict[str, torch.Tensor] | None = None,
                logit_scale_nn: torch.Tensor | None = None,
                logit_scale_xnn: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, index: torch.Tensor | None = None,
                target_ids: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``index`` (the rows' samples) and ``target_ids`` (per target, the sample each row's
        target stems from) are needed only when colliding targets are masked or made positives."""
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
        def term(x: torch.Tensor, key: str, scale: torch.Tensor) -> torch.Tensor:
            if self.collisions == "none":
                return info_nce(x, targets[key], scale, self.local_loss)
            if index is None or target_ids is None:
                raise ValueError("colliding targets can only be found with the rows' index and target ids")
            return info_nce(x, targets[key], scale, self.local_loss, duplicates=self.collisions,
                            collisions=(index.to(x.device), target_ids[key].to(x.device)))

        if self.lambda_nn != 0:
            loss_nn = (term(u, "nn_image", s_nn) + term(v, "nn_text", s_nn)) / 2
            loss = loss + self.lambda_nn * loss_nn
            out["loss_nn"] = loss_nn.detach()
        if self.lambda_xnn != 0:
            loss_xnn = (term(u, "xnn_image", s_xnn) + term(v, "xnn_text", s_xnn)) / 2
            loss = loss + self.lambda_xnn * loss_xnn
            out["loss_xnn"] = loss_xnn.detach()
        out["loss"] = loss
        return out


# --------------------------------------------------------------------------- terms of the peer methods


def one_way_nce(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, local_loss: bool = False) -> torch.Tensor:
    """``CE(s x y^T, I)``: each x row picks its own y row among all y rows (one direction only),
    over the global batch with several processes."""
    rank, world = rank_and_world()
    labels = torch.arange(x.shape[0], device=x.device)
    if world > 1:
        all_y = gather_with_grad(y)
        if local_loss:
            return F.cross_entropy(logit_scale * x @ all_y.T, labels + rank * x.shape[0])
        x, y = gather_with_grad(x), all_y
        labels = torch.arange(x.shape[0], device=x.device)
    return F.cross_entropy(logit_scale * x @ y.T, labels)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the global batch: among the other 2N - 1 views, each view picks the
    other view of its own image. ``z1``, ``z2``: B x d projections of two views (normalised here)."""
    z = F.normalize(torch.cat([gather_with_grad(z1), gather_with_grad(z2)]) if rank_and_world()[1] > 1
                    else torch.cat([z1, z2]), dim=1)
    n = z.shape[0] // 2
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, labels)


def relational_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of in-batch similarity distributions, over the global batch: row i's
    distribution is the softmax over j != i of ``x_i . x_j / temperature``. ``student``: B x d
    (normalised, with gradient); ``teacher``: B x d_t normalised teacher features (no gradient)."""
    if rank_and_world()[1] > 1:
        from ..distributed import gather_rows

        student, teacher = gather_with_grad(student), gather_rows(teacher)
    n = student.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=student.device)
    log_p_student = F.log_softmax((student @ student.T / temperature)[off_diagonal].view(n, n - 1), dim=1)
    teacher = teacher.to(student.device, student.dtype)
    p_teacher = F.softmax((teacher @ teacher.T / temperature)[off_diagonal].view(n, n - 1), dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean")
