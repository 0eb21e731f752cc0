"""Files: written whole or not at all, read without running code, in folders that hold only what clip-ping wrote.

- `atomic`: every write through a temporary file, fsync and rename; a full disk in one line.
- `torch_files`: `load_torch_file`, the one place a torch file is read (``weights_only=True``).
- `folders`: the folder marker, `claim_folder` / `claim_files`, and the lock of a long writer.
"""

from __future__ import annotations

from .atomic import (
    DiskFull,
    atomic_copy,
    atomic_save_npy,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    disk_full_cause,
    raise_disk_full,
    read_text,
    remove_stale_temporaries,
)
from .folders import LOCK, MARKER, FolderClaim, Legacy, claim_files, claim_folder
from .torch_files import CONVERT_COMMAND, load_torch_file, read_state_dict

__all__ = ["CONVERT_COMMAND", "LOCK", "MARKER", "DiskFull", "FolderClaim", "Legacy", "atomic_copy", "atomic_save_npy",
           "atomic_torch_save", "atomic_write", "atomic_write_json", "atomic_write_text", "claim_files", "claim_folder",
           "disk_full_cause", "load_torch_file", "raise_disk_full", "read_state_dict", "read_text",
           "remove_stale_temporaries"]
