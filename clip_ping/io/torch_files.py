"""Torch files read without running code from them.

Unpickling can call any function a file names. `load_torch_file` is the one place
clip-ping reads a torch file, with ``weights_only=True`` and no fallback: tensors
and plain values only. A file that needs more is refused in one line.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ..errors import DataError

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
