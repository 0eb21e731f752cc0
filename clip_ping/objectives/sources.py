"""Where the neighbours p (image side) and q (text side) of a batch's rows come from.

A source answers ``pick(index, step) -> (p, q)`` with sample indices, and may
keep state (a queue) that it updates in ``after_step`` and saves in checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from ..banks.format import FeatureBanks
from ..distributed import gather_rows, own_rows
from ..errors import ConfigError
from ..knn import NeighborQueue, NeighborTable


class NeighborSource(Protocol):
    def pick(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def after_step(self, index: torch.Tensor) -> None: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: dict[str, Any] | None) -> None: ...


class DatasetNeighbors:
    """Neighbours precomputed over the whole data set (`clip-ping neighbors`):
    the nearest, or one of the ``top_k`` nearest drawn at each step."""

    def __init__(self, table: NeighborTable, top_k: int = 1, seed: int = 0, rank: int | None = None,
                 world: int | None = None):
        from ..distributed import rank_and_world

        self.table, self.top_k, self.seed = table, top_k, seed
        # the process's slice of the global batch (given explicitly in loader workers, which have no process group)
        self.rank, self.world = rank_and_world() if rank is None or world is None else (rank, world)

    @classmethod
    def open(cls, bank_dir: Path, banks: FeatureBanks, top_k: int, seed: int) -> "DatasetNeighbors":
        """The neighbour table stored with ``banks``, checked to hold at least ``top_k`` neighbours."""
        from ..knn import load_neighbors

        table = load_neighbors(bank_dir, expected_fingerprint=banks.fingerprint())
        if top_k > table.k:
            raise ConfigError(f"config key 'neighbor_topk': {top_k} exceeds the k={table.k} "
                              f"neighbours stored in {bank_dir}; re-run clip-ping neighbors with a larger --k")
        return cls(table, top_k, seed)

    def pick(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # one generator per step: the draws are the same after a resume
        g = torch.Generator().manual_seed(self.seed * 7_919 + step)
        if self.world == 1 or self.top_k == 1:
            return self.table.pick(index, self.top_k, g)
        # draw for the whole global batch and keep this process's rows, so every row gets the
        # draw it gets on one process (the draws depend on positions only; other rows stand in as 0)
        n = len(index)
        pad = lambda k: torch.zeros(k * n, dtype=index.dtype, device=index.device)  # noqa: E731
        padded = torch.cat([pad(self.rank), index, pad(self.world - self.rank - 1)])
        p, q = self.table.pick(padded, self.top_k, g)
        own = slice(self.rank * n, (self.rank + 1) * n)
        return p[own], q[own]

    def after_step(self, index: torch.Tensor) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class PrefetchNeighborRows:
    """Runs in the loader workers: picks a batch's p and q from the data-set table exactly as
    `DatasetNeighbors` does at that step, and reads their bank rows.

    It pickles as paths and reopens the memory maps in each worker (pickling a
    memory map would copy the whole table or bank into every worker).
    """

    def __init__(self, bank_dir: str, bank_fingerprint: str, top_k: int, seed: int):
        from ..distributed import rank_and_world

        self.bank_dir, self.bank_fingerprint, self.top_k, self.seed = bank_dir, bank_fingerprint, top_k, seed
        self.rank, self.world = rank_and_world()  # of the training process that builds it
        self._opened: tuple[DatasetNeighbors, FeatureBanks] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}

    def __call__(self, index: torch.Tensor, step: int) -> dict[str, Any]:
        if self._opened is None:
            from ..banks.format import open_banks
            from ..knn import load_neighbors

            table = load_neighbors(self.bank_dir, expected_fingerprint=self.bank_fingerprint)
            self._opened = (DatasetNeighbors(table, self.top_k, self.seed, self.rank, self.world),
                            open_banks(self.bank_dir))
        source, banks = self._opened
        p, q = source.pick(index, step)
        return {"step": step, "index": index, "p": p, "q": q, "rows": (*banks.gather(p), *banks.gather(q))}


class QueueNeighbors:
    """METHOD.md "queue neighbours": p and q searched among a FIFO of recent samples,
    keyed by their teacher features from the banks.

    With several processes every one searches among, and then queues, the whole global
    batch, so all hold the same queue and pick what one process would."""

    def __init__(self, queue: NeighborQueue, banks: FeatureBanks):
        self.queue, self.banks = queue, banks

    def pick(self, index: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        everyone = gather_rows(index.cpu())
        p, q = self.queue.query(everyone, *self.banks.gather(everyone))
        own = own_rows(len(index))
        return p[own], q[own]

    def after_step(self, index: torch.Tensor) -> None:
        everyone = gather_rows(index.cpu())
        self.queue.push(everyone, *self.banks.gather(everyone))

    def state_dict(self) -> dict[str, Any]:
        return self.queue.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.queue.load_state_dict(state)
