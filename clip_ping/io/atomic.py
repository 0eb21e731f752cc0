"""Files that are never half-written.

Every write goes to a temporary file in the target's folder, is flushed to
disk (fsync) and renamed over the target (atomic on POSIX): a reader, or a
run killed at any moment, sees the old file or the new one, never a mix. A
write that fails (a full disk, a folder that is not writable) removes its
temporary file and raises one clear `DataError` (`DiskFull` for a full disk);
temporaries left by a killed process are removed by `remove_stale_temporaries`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from ..errors import DataError


class DiskFull(DataError):
    """The disk filled up during a write; the message says where, and what is intact."""


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The out-of-space error behind ``exc`` (itself, or what it was raised from: torch.save turns the file's
    ENOSPC into a RuntimeError whose context holds it); None when the disk is not full."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def raise_disk_full(path: Path, intact: str = "") -> None:
    """Raise `DiskFull` for ``path``: where, and (``intact``) what earlier work is still whole."""
    raise DiskFull(f"the disk is full (No space left on device): cannot write {path}; "
                   f"{intact or 'nothing was half-written'}; free some space and run the command again") from None


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
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if disk_full_cause(exc) is not None:
            raise_disk_full(path)
        if isinstance(exc, OSError):
            raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """Write ``path`` as a copy of the complete file ``source``, atomically (its own file, never a link:
    changing one never changes the other)."""
    with open(source, "rb") as src:
        atomic_write(path, lambda f: shutil.copyfileobj(src, f, 16 * 2**20))


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


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path``; a file in another encoding is one `DataError` naming the file and the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as "
                        "UTF-8") from None
