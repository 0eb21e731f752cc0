"""What the student embeddings of a batch are pulled to, given its neighbours p and q.

Both providers return the four targets of METHOD.md's table:
``nn_image`` (u_i <-> image of p_i), ``xnn_image`` (u_i <-> caption of p_i),
``nn_text`` (v_i <-> caption of q_i), ``xnn_text`` (v_i <-> image of q_i).
"""

from __future__ import annotations

from typing import Any

import torch

from ..banks.format import FeatureBanks
from ..model.heads import NeighborGuidance


class TeacherTargets:
    """The neighbours' teacher features, read from the banks and carried into the
    student space by the learnable heads h_A, h_B (the default)."""

    def __init__(self, banks: FeatureBanks, heads: NeighborGuidance):
        self.banks, self.heads = banks, heads

    def __call__(self, index: torch.Tensor, u: torch.Tensor, v: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                 rows: tuple[torch.Tensor, ...] | None = None) -> dict[str, torch.Tensor]:
        """``rows``: the bank rows (a_p, b_p, a_q, b_q) when already read, e.g. by the loader workers."""
        if rows is None:
            rows = (*self.banks.gather(p), *self.banks.gather(q))
        a_p, b_p, a_q, b_q = rows
        return self.from_rows(a_p, b_p, a_q, b_q, device=u.device)

    def from_rows(self, a_p: torch.Tensor, b_p: torch.Tensor, a_q: torch.Tensor, b_q: torch.Tensor,
                  device: torch.device) -> dict[str, torch.Tensor]:
        """The targets from bank rows already read (e.g. by the loader workers)."""
        def to(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return self.heads.targets(to(a_p), to(b_p), to(a_q), to(b_q))

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass


class StudentTargets:
    """METHOD.md "student targets": the neighbours' last stored student embeddings, detached.

    The memory holds the latest (u, v) of every sample; this batch's rows are
    written first, since a row's neighbour may be in the same batch.
    """

    def __init__(self, n_samples: int, embed_dim: int):
        self.memory = torch.zeros(2, n_samples, embed_dim)

    def __call__(self, index: torch.Tensor, u: torch.Tensor, v: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                 rows: tuple[torch.Tensor, ...] | None = None) -> dict[str, torch.Tensor]:
        memory = self.memory
        memory[0, index], memory[1, index] = u.detach().float().cpu(), v.detach().float().cpu()
        dev = u.device
        return {"nn_image": memory[0, p].to(dev), "xnn_image": memory[1, p].to(dev),
                "nn_text": memory[1, q].to(dev), "xnn_text": memory[0, q].to(dev)}

    def state_dict(self) -> torch.Tensor:
        return self.memory

    def load_state_dict(self, state: torch.Tensor | None) -> None:
        if state is not None:
            self.memory.copy_(state)


class StudentTableTargets:
    """``--targets student_table``: for data-set-wide neighbours, the neighbours' latest student
    embeddings (detached) from a table over the whole training set.

    Rule for a neighbour the student has not embedded yet in this run (the table
    is in the checkpoint, so a resumed run is the same run): its teacher target
    through the heads, as in the default reading. The rows of the current
    (global) batch are written first, so a neighbour in the batch is never stale.
    """

    def __init__(self, n_samples: int, embed_dim: int, teacher: TeacherTargets):
        self.memory = torch.zeros(2, n_samples, embed_dim)
        self.seen = torch.zeros(n_samples, dtype=torch.bool)
        self.teacher = teacher

    @torch.no_grad()
    def write(self, index: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
        """Store the embeddings of the rows of every process (each holds the same table)."""
        from ..distributed import gather_rows

        index = gather_rows(index.cpu())
        self.memory[0, index] = gather_rows(u.detach().float()).cpu()
        self.memory[1, index] = gather_rows(v.detach().float()).cpu()
        self.seen[index] = True

    def __call__(self, index: torch.Tensor, u: torch.Tensor, v: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                 rows: tuple[torch.Tensor, ...] | None = None) -> dict[str, torch.Tensor]:
        self.write(index, u, v)
        fallback = self.teacher(index, u, v, p, q, rows)
        p, q, dev = p.cpu(), q.cpu(), u.device
        stored = {"nn_image": (0, p), "xnn_image": (1, p), "nn_text": (1, q), "xnn_text": (0, q)}
        out = {}
        for key, (side, rows_of) in stored.items():
            seen = self.seen[rows_of].to(dev)[:, None]
            out[key] = torch.where(seen, self.memory[side, rows_of].to(dev), fallback[key])
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"memory": self.memory, "seen": self.seen}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None:
            self.memory.copy_(state["memory"])
            self.seen.copy_(state["seen"])
