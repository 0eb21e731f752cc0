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


# files that say a folder holds a table or shards, not class folders of images
_TABLE_LIKE = (".csv", ".tsv", ".jsonl", ".parquet", ".tar", SHARD_DESCRIPTOR)


def _tables_beside(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if p.is_file() and p.name.lower().endswith(_TABLE_LIKE))


def _open_image_folder(data_dir: Path, split: str, names_file: str | None) -> PairSource:
    """An image folder, or one line that says which layouts were tried and why each did not fit."""
    from .folders import read_image_folder

    layout = folder_layout(data_dir, split)
    tried = [f"{split}.csv/{split}.tsv: none", f"{split}{SHARD_DESCRIPTOR}: none"]

    def no_layout(*why: str) -> DataError:
        return DataError(f"data set folder {data_dir} matches no layout for split '{split}' "
                         f"({'; '.join([*tried, *why])})")

    if layout is None:  # other splits are tables: this one is missing
        others = ", ".join(stored_splits(data_dir))
        raise no_layout(f"image folders: not tried, the folder stores its splits as tables ({others})")
    if layout == "splits":
        folder = data_dir / split
        if not folder.is_dir():
            raise no_layout(f"{split}/<class>/ image folders: no {split}/ folder")
        return read_image_folder(folder, names_file)[0]
    tables = _tables_beside(data_dir)
    if tables:
        # e.g. train_pairs.csv beside images/: its sub-folders are not classes, and their names no captions
        raise no_layout(f"<class>/ image folders: the folder also holds {', '.join(tables[:3])}"
                                f"{' ...' if len(tables) > 3 else ''}, so its sub-folders are not taken for classes "
                                f"(pass a table file itself as --data)")
    try:
        return read_image_folder(data_dir, names_file)[0]
    except DataError as exc:
        raise no_layout(f"<class>/ image folders: {exc}") from None
