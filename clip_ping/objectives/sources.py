"""Where the neighbours p (image side) and q (text side) of a batch's rows come from.

A source answers ``pick(index, step) -> (p, q)`` with sample indices, and may
keep state (a queue) that it updates in ``after_step`` and saves in checkpoints.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..banks import FeatureBanks
from ..neighbors import NeighborQueue, NeighborTable


class NeighborSource(Protocol):
    def pick(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def after_step(self, index: torch.Tensor) -> None: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: dict[str, Any] | None) -> None: ...


class DatasetNeighbors:
    """Neighbours precomputed over the whole data set (`clip-ping neighbors`):
    the nearest, or one of the ``top_k`` nearest drawn at each step."""

    def __init__(self, table: NeighborTable, top_k: int = 1, seed: int = 0):
        self.table, self.top_k, self.seed = table, top_k, seed

    def pick(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # one generator per step: the draws are the same after a resume
        g = torch.Generator().manual_seed(self.seed * 7_919 + step)
        return self.table.pick(index, self.top_k, g)

    def after_step(self, index: torch.Tensor) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class QueueNeighbors:
    """METHOD.md "queue neighbours": p and q searched among a FIFO of recent samples,
    keyed by their teacher features from the banks."""

    def __init__(self, queue: NeighborQueue, banks: FeatureBanks):
        self.queue, self.banks = queue, banks

    def pick(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.queue.query(index, *self.banks.gather(index))

    def after_step(self, index: torch.Tensor) -> None:
        self.queue.push(index, *self.banks.gather(index))

    def state_dict(self) -> dict[str, Any]:
        return self.queue.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.queue.load_state_dict(state)
