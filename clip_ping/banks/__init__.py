"""Stage 1: frozen teacher features of every pair, in memory-mapped feature banks.

One job per module:

- `format`   the files of a bank on disk, its identity, and the reader of a finished bank (`FeatureBanks`)
- `writer`   the loop that decodes, encodes and writes rows, chunk by chunk
- `extract`  the stage (`clip-ping extract`): `ExtractConfig`, resuming, several processes

The public names are re-exported here, so ``from clip_ping.banks import X`` works.
"""

from .extract import ExtractConfig, extract_banks, text_precision
from .format import (
    BANK_FILES,
    FORMAT_VERSION,
    IDENTITY_DEFAULTS,
    MANIFEST,
    WORK_DIR,
    FeatureBanks,
    check_table,
    chunk_marker,
    done_chunks,
    duplicate_groups_of_captions,
    duplicate_groups_of_hashes,
    identity_of,
    normalize_caption,
    open_banks,
    read_json,
    with_identity_defaults,
)
from .writer import SPLIT_TRANSFORM, extract_chunks

__all__ = [
    "BANK_FILES", "FORMAT_VERSION", "IDENTITY_DEFAULTS", "MANIFEST", "SPLIT_TRANSFORM", "WORK_DIR",
    "ExtractConfig", "FeatureBanks",
    "check_table", "chunk_marker", "done_chunks", "duplicate_groups_of_captions", "duplicate_groups_of_hashes",
    "extract_banks", "extract_chunks", "identity_of", "normalize_caption", "open_banks", "read_json", "text_precision",
    "with_identity_defaults",
]
