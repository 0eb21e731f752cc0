"""The table contract and its one opener: every stage reads a split through `open_table`.

A split is stored in one of three forms, and each opens as a `PairSource`:

* a CSV/TSV of image paths and captions (`clip_ping.data.pairs.PairTable`),
* WebDataset tar shards with their index (`clip_ping.data.shards.ShardTable`),
* an image folder, ``<class>/`` sub-folders (captions made from the class names).

Row ``i`` of a source is sample index ``i`` everywhere: banks, neighbour tables,
batches and evaluation all index by it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError
from .csv_reader import read_pairs
from .pairs import SPLITS, TABLE_SUFFIXES
from .source import PairSource

SHARD_DESCRIPTOR = ".shards.json"


def stored_splits(data_dir: str | Path) -> list[str]:
    """The splits a data folder stores as tables or shards (``<split>.csv``/``.tsv``/``.shards.json``)."""
    data_dir = Path(data_dir)
    suffixes = (*TABLE_SUFFIXES, SHARD_DESCRIPTOR)
    return [s for s in SPLITS if any((data_dir / f"{s}{suffix}").is_file() for suffix in suffixes)]


def folder_layout(data_dir: str | Path, split: str = "test") -> str | None:
    """How a data folder holds its splits: None for tables or shards (``<split>.csv``,
    ``<split>.shards.json``), ``"splits"`` for image folders per split (``<split>/<class>/``),
    ``"classes"`` for one image folder (``<class>/``)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return None
    names = {split, *SPLITS}
    suffixes = (*TABLE_SUFFIXES, SHARD_DESCRIPTOR)
    if any((data_dir / f"{s}{suffix}").is_file() for s in names for suffix in suffixes):
        return None
    return "splits" if any((data_dir / s).is_dir() for s in names) else "classes"


def open_table(source: str | Path, split: str = "train", names_file: str | None = None,
               **csv_options: Any) -> PairSource:
    """The rows of one split, whatever its storage.

    ``source`` is a CSV/TSV file, a shard descriptor (``*.shards.json``), or a data
    set folder holding ``<split>.csv``/``.tsv``, ``<split>.shards.json`` or image
    folders (``<split>/<class>/``, or ``<class>/`` for the whole folder; ``names_file``
    maps folder names to class names). ``csv_options`` go to `read_pairs`.
    """
    from .shards import open_shards

    source = Path(source)
    if not source.is_dir():
        if source.name.endswith(SHARD_DESCRIPTOR):
            return open_shards(source)
        return read_pairs(source, **csv_options)
    descriptor = source / f"{split}{SHARD_DESCRIPTOR}"
    if descriptor.is_file():
        return open_shards(descriptor)
    for suffix in TABLE_SUFFIXES:
        if (source / f"{split}{suffix}").is_file():
            return read_pairs(source / f"{split}{suffix}", **csv_options)
    return _open_image_folder(source, split, names_file)


def _open_image_folder(data_dir: Path, split: str, names_file: str | None) -> PairSource:
    from .folders import read_image_folder

    layout = folder_layout(data_dir, split)
    missing = f"data set folder {data_dir} has no {split}.csv, {split}.tsv or {split}{SHARD_DESCRIPTOR}"
    if layout is None:  # other splits are tables: this one is missing
        raise DataError(missing)
    folder = data_dir / split if layout == "splits" else data_dir
    if layout == "splits" and not folder.is_dir():
        raise DataError(f"{missing}, and no {split}/ image folder")
    try:
        return read_image_folder(folder, names_file)[0]
    except DataError as exc:
        if layout == "splits":
            raise
        raise DataError(f"{missing}, and is not an image folder ({exc})") from None
