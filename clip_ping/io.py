"""Files that are never half-written.

Every write goes to a temporary file in the target's folder, is flushed to
disk (fsync) and renamed over the target (atomic on POSIX): a reader, or a
run killed at any moment, sees the old file or the new one, never a mix. A
write that fails (a full disk, a folder that is not writable) removes its
temporary file and raises one clear `DataError`; temporaries left by a killed
process are removed by `remove_stale_temporaries`.

Reading is as strict: `load_torch_file` is the one place a torch file is read,
and it never runs code from it (``weights_only=True``, no fallback).
"""

from __future__ import annotations

import json
import os
import pickle
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


CONVERT_COMMAND = "clip-ping convert-checkpoint --checkpoint {path} --trust-this-file"


def load_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """Tensors and plain values (dicts, lists, numbers, strings) of a torch file, read without running any code.

    Unpickling can call any function a file names; ``weights_only=True`` restricts it to
    tensors and plain types. A file that needs more is refused in one line naming the
    command that converts it, which the user runs knowingly; it is never loaded here.
    """
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower() and "weights_only" not in str(exc):
            raise DataError(f"cannot read {what} {path}: {_first_line(exc)}") from None
        remedy = (f"if you trust this file (e.g. a checkpoint of an earlier clip-ping), convert it once: "
                  f"{CONVERT_COMMAND.format(path=path)}" if what == "checkpoint" else
                  "if you trust it, save its tensors alone (a state dict, or safetensors) and pass that file")
        raise DataError(f"{what} {path} holds Python objects beyond tensors and plain values, and loading them could "
                        f"run code, so it is not loaded; {remedy}") from None
    except Exception as exc:  # a truncated, foreign or unreadable file
        raise DataError(f"cannot read {what} {path}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors of a ``.pth``/``.pt``/``.bin``/``.safetensors`` file (unwrapping ``state_dict``/``model``),
    read without running code from it."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = load_torch_file(path, "weights file")
    except DataError:
        raise
    except Exception as exc:  # truncated or foreign file
        raise DataError(f"cannot read weights file {path}: {_first_line(exc)}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DataError(f"weights file {path} does not hold a state dict of tensors")
    # Checkpoints saved from DistributedDataParallel prefix every key.
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)
