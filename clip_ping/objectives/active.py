"""A-CLIP-PING: CLIP-PING with an *active* teacher (our reading; the paper's body was not available).

The frozen teachers that built the banks run inside each training step, under
no_grad, on augmented images and on captions, and their features replace the
bank rows as the NN and XNN targets. Everything else (heads, loss, weights,
collision rule, XNN pairing) is CLIP-PING's. Two readings, by
``--neighbor-source``:

``dataset`` (default)
    Neighbours p_i, q_i still come from the precomputed table. What changes is
    where their features come from: the loader workers load each neighbour's
    image with exactly the augmentation the student gets for that sample in this
    epoch (the same per-sample seed), and its caption; the image teacher encodes
    those views, the text teacher those captions. **[choice]** the neighbour's
    own augmented view, rather than reusing the batch row's features. Cost: two
    extra image decodes per row in the workers, and the teachers on 2B images
    and 2B captions per step.

``queue``
    The teachers encode the batch's own rows: the very view the student sees,
    and its caption. These online features are the search keys of a FIFO queue
    of recent samples (plus the batch), and the targets are the found
    neighbours' online features as they were stored. Cost: the teachers on B
    images and B captions per step; the queue is in the checkpoint.

Teacher input **[choice]**: derived from the student's augmented tensor (undo
the student's normalisation, bilinear resize to the teacher's resolution or
``--teacher-image-size``, the teacher's normalisation), so the teacher sees the
student's view, not a second crop. A neighbour whose image cannot be decoded
keeps its bank row as target.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..banks.format import FeatureBanks, identity_of, open_banks
from ..distributed import gather_rows, own_rows, rank_and_world
from ..errors import ConfigError
from ..knn import NeighborQueue
from ..model.heads import NeighborGuidance
from ..teachers import ImageTeacher, TextTeacher, load_image_teacher, load_text_teacher
from ..teachers.base import compile_wanted
from .base import ObjectiveSettings, ObjectiveSetup, StepContext
from .clip_ping import ClipPingObjective, make_heads
from .sources import DatasetNeighbors, PrefetchNeighborRows
from .targets import TeacherTargets
from .views import ImageGeometry, geometry_of, to_teacher_input

log = logging.getLogger(__name__)


class OnlineTeachers:
    """The bank's frozen teachers, run on student-view tensors and raw captions; outputs L2-normalised."""

    def __init__(self, image: ImageTeacher, text: TextTeacher, student: ImageGeometry, image_size: int | None = None):
        self.image, self.text, self.student = image, text, student
        geometry = geometry_of(getattr(image, "_transform", None) or image.transform)
        size = (image_size, image_size) if image_size else geometry.size
        self.geometry = ImageGeometry(size, geometry.mean, geometry.std)

    def encode_images(self, views: torch.Tensor) -> torch.Tensor:
        x = to_teacher_input(views, self.student, self.geometry)
        return F.normalize(self.image.encode(x).clone(), dim=-1)  # clone: out of inference mode

    def encode_texts(self, captions: list[str]) -> torch.Tensor:
        return F.normalize(self.text.encode(captions).clone(), dim=-1)


class NeighbourViews(PrefetchNeighborRows):
    """Runs in the loader workers: the batch's neighbours p, q (as `DatasetNeighbors` picks them at
    that step), their bank rows, their student-augmented views and their captions.

    A neighbour's view is drawn exactly as the loader draws that sample's view in
    the step's epoch (`SeededAugmentation`), so the teacher sees the view the
    student sees of that sample in this epoch.
    """

    def __init__(self, bank_dir: str, bank_fingerprint: str, top_k: int, seed: int, table: Any,
                 image_transform: Callable[..., torch.Tensor], steps_per_epoch: int):
        super().__init__(bank_dir, bank_fingerprint, top_k, seed)
        self.table, self.image_transform, self.steps_per_epoch = table, image_transform, steps_per_epoch

    def __call__(self, index: torch.Tensor, step: int) -> dict[str, Any]:
        from ..data.order import SeededAugmentation
        from ..data.pairs import PairDataset

        out = super().__call__(index, step)
        samples = SeededAugmentation(PairDataset(self.table, self.image_transform), self.seed)
        epoch = step // max(1, self.steps_per_epoch)
        for side in ("p", "q"):
            loaded = [samples[(int(j), epoch, None)] for j in out[side].tolist()]
            ok = torch.tensor([s is not None for s in loaded])
            shape = next((s["image"].shape for s in loaded if s is not None), None)
            out[f"views_{side}"] = (torch.stack([s["image"] if s is not None else torch.zeros(shape) for s in loaded])
                                    if shape is not None else None)
            out[f"ok_{side}"] = ok
            out[f"captions_{side}"] = [self.table.captions[int(j)] for j in out[side].tolist()]
        return out


class OnlineFeatureQueue(NeighborQueue):
    """`NeighborQueue` whose keys are online teacher features, returning the found neighbours' features too.
    The objective pushes each step's (global) batch itself, after the step."""

    def after_step(self, index: torch.Tensor) -> None:
        pass

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            super().load_state_dict(state)

    @torch.no_grad()
    def nearest_features(self, index: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """(p, q, (a_p, b_p, a_q, b_q)) among the queue and this (global) batch, never the row itself.

        Searched on the queue's device; p and q come back on the CPU, the rows on the queue's device."""
        index, a, b = self._here(index).long(), self._here(a).float(), self._here(b).float()
        cand_a, cand_b = torch.cat([self.image_keys, a]), torch.cat([self.text_keys, b])
        cand_idx = torch.cat([self.indices, index])
        excluded = (cand_idx[None, :] < 0) | (cand_idx[None, :] == index[:, None])
        own = torch.arange(len(index), device=self.device) + len(self.indices)  # a row with no candidate keeps itself

        def best(scores: torch.Tensor) -> torch.Tensor:
            top_s, top = scores.masked_fill(excluded, float("-inf")).max(dim=1)
            return torch.where(torch.isinf(top_s), own, top)

        slot_p, slot_q = best(a @ cand_a.T), best(b @ cand_b.T)
        rows = (cand_a[slot_p], cand_b[slot_p], cand_a[slot_q], cand_b[slot_q])
        return cand_idx[slot_p].cpu(), cand_idx[slot_q].cpu(), rows


def online_teacher_size(requested: int | None, banks: FeatureBanks) -> int | None:
    """The side the online image teacher runs at: the bank's (so the online targets come from the teacher
    that built the bank and its neighbours) unless the user asks for another, which is then logged."""
    bank_size = identity_of(banks.manifest)["teacher_image_size"]
    if requested is None:
        return bank_size
    if requested != bank_size:
        log.warning("teacher_image_size %d: the online image teacher runs at another resolution than the bank's "
                    "(%s), so its targets are not the features of the teacher that found the neighbours",
                    requested, bank_size or "the teacher's own")
    return requested


def compile_online_teacher(image: ImageTeacher, cfg: ObjectiveSettings, n_rows: int, device: torch.device) -> None:
    """Compile the online image teacher for this run's calls (the local batch of views, once or twice a step)."""
    _, world = rank_and_world()
    rows = cfg.batch_size // world
    calls_per_step = 2 if cfg.neighbor_source == "dataset" else 1
    if compile_wanted(cfg.teacher_compile, device, rows * calls_per_step * cfg.total_steps(n_rows)):
        log.info("a-clip-ping: compiling the online image teacher (torch.compile, %d rows a call)", rows)
        image.compile(rows)


class ActiveClipPingObjective(ClipPingObjective):
    name = "a-clip-ping"

    def __init__(self, banks: FeatureBanks, heads: NeighborGuidance, teachers: OnlineTeachers,
                 source: DatasetNeighbors | OnlineFeatureQueue, preparer: NeighbourViews | None,
                 lambda_nn: float = 0.5, lambda_xnn: float = 0.5, **options: Any):
        super().__init__(banks, source, heads, TeacherTargets(banks, heads), lambda_nn, lambda_xnn, **options)  # type: ignore[arg-type]
        self.__dict__["teachers"] = teachers  # frozen, outside the module tree: not trained, not checkpointed
        self._preparer = preparer
        self._pending: tuple[torch.Tensor, ...] | None = None  # the queue reading's batch keys, pushed after the step

    @classmethod
    def from_setup(cls, setup: ObjectiveSetup) -> "ActiveClipPingObjective":
        cfg = setup.cfg
        if cfg.targets != "teacher":
            raise ConfigError("config key 'targets': --method a-clip-ping pulls toward online teacher features "
                              "(targets teacher)")
        if setup.image_transform is None:
            raise ConfigError("--method a-clip-ping needs the student's image transform")
        bank_dir = setup.bank_dir
        banks = open_banks(bank_dir, setup.table)
        names = banks.manifest.get("teachers") or {}
        if not names.get("image", {}).get("name") or not names.get("text", {}).get("name"):
            raise ConfigError(f"the bank {bank_dir} does not name its teachers; rebuild it with clip-ping extract")
        device = str(setup.device)
        teachers = OnlineTeachers(load_image_teacher(names["image"]["name"], device),
                                  load_text_teacher(names["text"]["name"], device),
                                  geometry_of(setup.image_transform), online_teacher_size(cfg.teacher_image_size, banks))
        if (teachers.image.dim, teachers.text.dim) != (banks.image_dim, banks.text_dim):
            raise ConfigError(f"the teachers named by bank {bank_dir} give {teachers.image.dim}/{teachers.text.dim}-d "
                              f"features, the bank holds {banks.image_dim}/{banks.text_dim}-d")
        compile_online_teacher(teachers.image, cfg, len(setup.table), setup.device)
        heads = make_heads(setup, banks)  # the same heads as CLIP-PING's at this seed
        source: DatasetNeighbors | OnlineFeatureQueue
        preparer = None
        if cfg.neighbor_source == "dataset":
            source = DatasetNeighbors.open(bank_dir, banks, cfg.neighbor_topk, cfg.seed)
            preparer = NeighbourViews(str(bank_dir), banks.fingerprint(), cfg.neighbor_topk, cfg.seed, setup.table,
                                      setup.image_transform, len(setup.table) // cfg.batch_size)
        else:
            source = OnlineFeatureQueue(cfg.queue_size, banks.image_dim, banks.text_dim, device=setup.device)
        return cls(banks, heads, teachers, source, preparer, *cfg.neighbor_weights, **cls._common_options(setup))

    @property
    def has_unused_parameters(self) -> bool:
        return False

    def batch_preparer(self) -> NeighbourViews | None:
        return self._preparer

    def loss(self, u: torch.Tensor, v: torch.Tensor, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        if isinstance(self.source, OnlineFeatureQueue):
            p, q, rows = self._from_queue(batch, u.device)
        else:
            p, q, rows = self._from_neighbour_views(batch, ctx.step)
        found = self.targets(batch["index"], u, v, p, q, rows)
        return self.guided_loss(u, v, batch, ctx, found, p, q)

    def _from_neighbour_views(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        index, prepared = batch["index"], batch.get("prepared")
        if not (prepared is not None and prepared["step"] == step and torch.equal(prepared["index"], index)
                and "views_p" in prepared):
            assert self._preparer is not None
            prepared = self._preparer(index.cpu(), step)  # e.g. rows trimmed on several processes
        a_p, _, a_q, _ = prepared["rows"]
        features = []
        for side, bank_rows in (("p", a_p), ("q", a_q)):
            ok = prepared[f"ok_{side}"]
            image = bank_rows.clone()
            if ok.any():
                image[ok] = self.teachers.encode_images(prepared[f"views_{side}"][ok])
            features += [image, self.teachers.encode_texts(prepared[f"captions_{side}"])]
        return prepared["p"], prepared["q"], tuple(features)

    def _from_queue(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        if "caption" not in batch:
            raise ConfigError("--method a-clip-ping needs the batch's raw captions (the loader did not keep them)")
        a = self.teachers.encode_images(batch["image"].to(device))
        b = self.teachers.encode_texts(batch["caption"])
        # every process searches among, and then queues, the same global batch
        index, a, b = gather_rows(batch["index"].cpu()), gather_rows(a), gather_rows(b)
        self._pending = (index, a, b)
        assert isinstance(self.source, OnlineFeatureQueue)  # the queue reading: neighbor_source=queue
        p, q, rows = self.source.nearest_features(index, a, b)
        rank_rows = own_rows(len(batch["index"]))
        return p[rank_rows], q[rank_rows], tuple(r[rank_rows] for r in rows)

    @torch.no_grad()
    def after_step(self, batch: dict[str, Any]) -> None:
        super().after_step(batch)  # clamps the per-term scales (the data-set source keeps no state)
        if isinstance(self.source, OnlineFeatureQueue) and self._pending is not None:
            self.source.push(*self._pending)
            self._pending = None
