"""Data: image-text pair tables, the torch dataset, and the built-in synthetic data set.

Read a split with `read_pairs`, wrap it in `PairDataset`, batch it with
`collate_pairs`. The folder format is documented in `clip_ping.data.pairs`.
The synthetic generator lives in `clip_ping.data.synth` (imported on demand).
"""

from .pairs import (
    DEFAULT_TEMPLATES,
    SPLITS,
    ImageDecodeError,
    PairDataset,
    PairTable,
    collate_pairs,
    load_image,
    read_dataset_info,
    read_pairs,
    split_file,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "SPLITS",
    "ImageDecodeError",
    "PairDataset",
    "PairTable",
    "collate_pairs",
    "load_image",
    "read_dataset_info",
    "read_pairs",
    "split_file",
]
