"""Data: image-text pair tables, the torch dataset, and the built-in synthetic data set.

Open a split with `open_table` (CSV, shards or image folders), wrap it in
`PairDataset`, batch it with `collate_pairs`. The folder format is documented
in `clip_ping.data.csv_reader`. The synthetic generator lives in
`clip_ping.data.synth` (imported on demand).
"""

from .csv_reader import read_pairs
from .dataset_info import DEFAULT_TEMPLATES, read_dataset_info
from .images import ImageDecodeError, load_image
from .pairs import SPLITS, PairDataset, PairTable, collate_pairs, split_file
from .table import PairSource, open_table

__all__ = [
    "DEFAULT_TEMPLATES",
    "SPLITS",
    "ImageDecodeError",
    "PairDataset",
    "PairSource",
    "PairTable",
    "collate_pairs",
    "load_image",
    "open_table",
    "read_dataset_info",
    "read_pairs",
    "split_file",
]
