"""Files that are never half-written.

Every write goes to a temporary file in the target's folder, is flushed to
disk (fsync) and renamed over the target (atomic on POSIX): a reader, or a
run killed at any moment, sees the old file or the new one, never a mix. A
write that fails (a full disk, a folder that is not writable) removes its
temporary file and raises one clear `DataError`; temporaries left by a killed
process are removed by `remove_stale_temporaries`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from .errors import DataError


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` atomically with ``write(binary_file)``."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_link(source: str | Path, path: str | Path) -> bool:
    """Make ``path`` a hard link to the complete file ``source``, atomically; False where links cannot be made.

    Two names of one file: a checkpoint written once under both names costs one
    write, not two. Neither name can be half-written, as ``source`` is complete.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:  # a file system without hard links, say: the caller writes the file itself
        tmp.unlink(missing_ok=True)
        return False
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder: str | Path) -> int:
    """Remove the temporaries of writes that a killed process left in ``folder``; returns how many."""
    removed = 0
    for stale in Path(folder).glob(".*.tmp*"):
        stale.unlink(missing_ok=True)
        removed += 1
    return removed
