"""The data order of training: which samples each step trains on, and their augmentation.

Everything is derived from (seed, epoch, step, sample index), never carried as
state, so a run resumed at any step sees the batches and augmentations it would
have seen without stopping, whatever the number of loader workers or processes.
"""

from __future__ import annotations

import signal
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from .pairs import PairDataset, collate_pairs


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one epoch from a permutation seeded by (seed, epoch), starting at a given batch.

    Each process takes its contiguous slice of every global batch, so the global
    batch is the same whatever the number of processes.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start_batch: int = 0,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start_batch, self.rank, self.world = start_batch, rank, world

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.batch_size // self.world
        for b in range(self.start_batch, self.n // self.batch_size):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker init: leave SIGTERM/SIGINT to the training process.

    Schedulers and Ctrl-C signal the whole process group; a worker killed by
    them would crash the run before it can finish its step and save.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class SeededAugmentation(torch.utils.data.Dataset):
    """Seeds the random image augmentation of sample i from (seed, epoch, i).

    The augmentation a sample gets no longer depends on which worker loads it
    or on whether the run was resumed.
    """

    def __init__(self, dataset: PairDataset, seed: int, epoch: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict[str, Any] | None:
        """Sample ``i`` of this dataset's epoch, or for ``(i, epoch, step)`` sample ``i`` of that
        epoch, tagged with the step that will train on it."""
        i, epoch, step = key if isinstance(key, tuple) else (key, self.epoch, None)
        sample = self._seeded(int(i), int(epoch))
        if sample is not None and step is not None:
            sample["step"] = step
        return sample

    def _seeded(self, i: int, epoch: int) -> dict[str, Any] | None:
        seed = (self.seed * 1_000_003 + epoch * 10_007 + i) % (2**63)
        rng = torch.default_generator  # only the CPU generator: seeding every device costs more than the sample
        if torch.utils.data.get_worker_info() is not None:
            rng.manual_seed(seed)  # a loader worker: nobody else uses its generator
            return self.dataset[i]
        state = rng.get_state()  # the main process: leave the training RNG as it was
        try:
            rng.manual_seed(seed)
            return self.dataset[i]
        finally:
            rng.set_state(state)


class RunBatches(Sampler[list[tuple[int, int, int]]]):
    """Every remaining batch of a run, epoch after epoch, as ``(sample index, epoch, step)`` triples.

    One loader then serves the whole run: its workers live across epochs and
    prefetch over epoch boundaries, and work for a step (the objective's
    `batch_preparer`) can run in them. Each epoch's batches are those of
    `EpochBatchSampler`; every batch trains one step, skipped ones included.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start_batch: int, first_step: int,
                 total_steps: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start_batch, self.first_step, self.total_steps = epoch, start_batch, first_step, total_steps

    def __len__(self) -> int:
        return max(0, self.total_steps - self.first_step)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, start, step = self.epoch, self.start_batch, self.first_step
        while step < self.total_steps:
            for batch in EpochBatchSampler(self.n, self.batch_size, self.seed, epoch, start, self.rank, self.world):
                yield [(i, epoch, step) for i in batch]
                step += 1
                if step >= self.total_steps:
                    return
            epoch, start = epoch + 1, 0


def collate_and_prepare(samples: list[dict[str, Any] | None], tokenizer: Any = None,
                        prepare: Any = None, finish_images: Any = None) -> dict[str, Any]:
    """`collate_pairs`, then the objective's preparation of the batch for its step (in the worker)."""
    batch = collate_pairs(samples, tokenizer=tokenizer, finish_images=finish_images)
    kept = [s for s in samples if s is not None]
    # raw captions, for objectives that run a text teacher
    if kept and "caption" in kept[0]:
        batch["caption"] = [s["caption"] for s in kept]
    elif kept and isinstance(kept[0]["text"], str):
        batch["caption"] = [s["text"] for s in kept]
    if kept and "views" in kept[0]:
        batch["image_views"] = torch.stack([torch.stack(s["views"]) for s in kept])  # B x V x C x H x W
    steps = {s["step"] for s in samples if s is not None and "step" in s}
    if prepare is not None and len(steps) == 1 and len(batch["index"]) > 0:
        batch["prepared"] = prepare(batch["index"], steps.pop())
    return batch
