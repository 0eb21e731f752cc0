"""The training-time queue variant: neighbours searched among recent samples (METHOD.md "queue neighbours")."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError


class NeighborQueue:
    """METHOD.md "queue neighbours": search p_i / q_i among recent samples instead of the data set.

    A FIFO of the last ``size`` samples' teacher features (keys: image a_j and text b_j)
    and their sample indices. ``query`` returns, per sample, the index of the queued
    sample with the most similar image key (p) and text key (q), never the sample
    itself. With ``include_batch`` the current batch is searched too, so the very
    first step already has neighbours. A sample with no candidate at all (empty
    queue and a batch of one) gets itself.

    The queue lives on ``device`` (the training device), so each step's search is one
    product there, not a CPU round trip; its state_dict is on the CPU either way.
    """

    def __init__(self, size: int, image_dim: int, text_dim: int, include_batch: bool = True,
                 device: str | torch.device = "cpu") -> None:
        if size < 1:
            raise ConfigError(f"queue size must be at least 1, got {size}")
        self.size = size
        self.include_batch = include_batch
        self.device = torch.device(device)
        self.image_keys = torch.zeros(size, image_dim, device=self.device)
        self.text_keys = torch.zeros(size, text_dim, device=self.device)
        self.indices = torch.full((size,), -1, dtype=torch.int64, device=self.device)  # -1 = empty slot
        self.ptr = 0  # next slot to write

    def __len__(self) -> int:
        return int((self.indices >= 0).sum())

    @torch.no_grad()
    def push(self, index: torch.Tensor, image_keys: torch.Tensor, text_keys: torch.Tensor) -> None:
        """Append a batch (oldest entries are overwritten)."""
        index = self._here(index).long()[-self.size:]
        a = _normalize_rows(self._here(image_keys).float()[-self.size:])
        b = _normalize_rows(self._here(text_keys).float()[-self.size:])
        slots = (self.ptr + torch.arange(len(index), device=self.device)) % self.size
        self.image_keys[slots], self.text_keys[slots], self.indices[slots] = a, b, index
        self.ptr = int((self.ptr + len(index)) % self.size)

    @torch.no_grad()
    def query(self, index: torch.Tensor, image_keys: torch.Tensor, text_keys: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, q): sample indices of the nearest queued sample by image key and by text key."""
        index = self._here(index).long()
        a = _normalize_rows(self._here(image_keys).float())
        b = _normalize_rows(self._here(text_keys).float())
        p = self._nearest(index, a, self.image_keys, a)
        q = self._nearest(index, b, self.text_keys, b)
        return p.to(image_keys.device), q.to(image_keys.device)

    def _here(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(self.device, non_blocking=True)

    def _nearest(self, index: torch.Tensor, keys: torch.Tensor, queued: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        cand_keys, cand_idx = queued, self.indices
        if self.include_batch:
            cand_keys, cand_idx = torch.cat([queued, batch]), torch.cat([self.indices, index])
        scores = keys @ cand_keys.T
        excluded = (cand_idx[None, :] < 0) | (cand_idx[None, :] == index[:, None])
        scores.masked_fill_(excluded, float("-inf"))
        best_s, best = scores.max(dim=1)
        return torch.where(torch.isinf(best_s), index, cand_idx[best])

    def state_dict(self) -> dict[str, Any]:
        return {"image_keys": self.image_keys.cpu().clone(), "text_keys": self.text_keys.cpu().clone(),
                "indices": self.indices.cpu().clone(), "ptr": self.ptr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["image_keys"].shape) != tuple(self.image_keys.shape) or \
                tuple(state["text_keys"].shape) != tuple(self.text_keys.shape):
            raise ConfigError("the checkpoint's neighbour queue has another size or key dimension than this run")
        self.image_keys.copy_(state["image_keys"])
        self.text_keys.copy_(state["text_keys"])
        self.indices.copy_(state["indices"])
        self.ptr = int(state["ptr"])


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
