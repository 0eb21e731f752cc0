"""The table contract: what every stage needs of a split, whatever its storage (`PairSource`).

`clip_ping.data.table.open_table` returns one; `PairTable` (CSV), `ShardTable`
(tar shards) and the image-folder table are the three that exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from PIL import Image


@runtime_checkable
class PairSource(Protocol):
    """What every stage needs of a split, whatever its storage."""

    source: Path                     # the file (or folder) it was read from
    skipped: dict[str, int]          # rows left out, by reason

    # read-only: a list, or a compact column (`shard_index.StringColumn`) for large shard indexes
    @property
    def captions(self) -> Sequence[str]: ...

    @property
    def labels(self) -> Mapping[str, Sequence[str]]:
        """Label column -> class name per row."""

    def __len__(self) -> int: ...

    @property
    def image_ids(self) -> Sequence[str]:
        """One id per row; rows that share an image share an id."""

    def open_image(self, i: int) -> Image.Image:
        """Row i's image as RGB (raises `ImageDecodeError`)."""

    def read_image_bytes(self, i: int) -> bytes:
        """Row i's encoded image (raises OSError)."""

    def fingerprint(self) -> str:
        """A hash of the rows: banks built for other rows are refused."""

    def summary(self) -> dict[str, Any]:
        """Counts for logs and JSON reports."""
