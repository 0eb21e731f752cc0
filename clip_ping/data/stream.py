"""Streaming WebDataset shards in training (`data_mode=stream`): sequential reads, any order, same indices.

Each sample's key maps back to its row of the shard index (`clip_ping.data.shards`),
so the streamed batches stay aligned with feature banks and neighbour tables.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import torch
from PIL import Image

from .images import ImageDecodeError, load_image
from .shards import ShardTable

log = logging.getLogger(__name__)


class ShardStream(torch.utils.data.IterableDataset):
    """Stream a ShardTable's tars with webdataset; yields ``{"index", "image", "text"}`` (or None).

    Shards are split over distributed processes and over loader workers, so each
    sample is read once per epoch. ``index`` comes from the key -> index map and
    the caption from the index, so alignment does not depend on the order of reading.
    Call `set_epoch` before each epoch to change the shuffle.
    """

    def __init__(
        self,
        table: ShardTable,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        shuffle_buffer: int = 0,
        shuffle_shards: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.table = table
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.epoch = 0
        self.keys = table.key_to_index  # built here, before loader workers fork and share it
        self.n_unknown_keys = 0
        self.n_decode_errors = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:  # samples per epoch over all workers, for progress bars
        return len(self.table)

    def _pipeline(self):
        import webdataset as wds

        urls = [str(self.table.shard_path(j)) for j in range(len(self.table.shards))]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        dataset = wds.WebDataset(
            urls,
            shardshuffle=len(urls) if self.shuffle_shards else False,
            detshuffle=True,
            seed=self.seed + self.epoch,
            nodesplitter=wds.split_by_node if distributed else wds.single_node_only,
            workersplitter=wds.split_by_worker,
            handler=wds.warn_and_continue,
            empty_check=False,
        )
        if self.shuffle_buffer > 1:
            # Runs inside the loader worker: one reproducible stream per (seed, epoch, worker).
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            dataset = dataset.shuffle(self.shuffle_buffer, seed=(self.seed * 1009 + self.epoch) * 101 + worker)
        return dataset

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        for sample in self._pipeline():
            index = self.keys.get(sample["__key__"])
            if index is None:
                self.n_unknown_keys += 1  # not in the index (skipped when indexing)
                continue
            ext = self.table.exts[index]
            data = next((v for k, v in sample.items() if k.rsplit(".", 1)[-1].lower() == ext), None)
            if data is None:
                continue
            try:
                image = load_image(data, sample["__key__"])
            except ImageDecodeError as exc:
                self.n_decode_errors += 1
                log.warning("sample %d (row %d of the index) dropped: %s", index, index, exc)
                yield None
                continue
            text: Any = self.table.captions[index]
            if self.tokenizer is not None:
                text = self.tokenizer([text])[0]
            yield {"index": index, "image": self.image_transform(image), "text": text}
