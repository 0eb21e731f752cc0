"""Checkpoint files that are never half-written.

Each save writes to a temporary file in the same folder, fsyncs it and renames
it over the target (atomic on POSIX), so ``latest.pt`` is always a complete
checkpoint, whatever moment the process is killed at.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, option
from ..errors import ConfigError, DataError
from ..io import (
    DiskFull,
    FolderClaim,
    atomic_copy,
    atomic_torch_save,
    atomic_write_text,
    load_torch_file,
    remove_stale_temporaries,
)
from ..model.student import nonfinite_tensors  # noqa: F401  (re-exported: its name here before the student's check moved)

__all__ = ["atomic_torch_save", "atomic_write_text", "load_checkpoint", "resolve_resume", "save_checkpoint"]

_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def save_checkpoint(state: dict[str, Any], folder: Path, step: int, keep: int = 2,
                    claim: FolderClaim | None = None) -> Path:
    """Write ``latest.pt`` and, with ``keep`` > 0, ``step_<step>.pt``, keeping the newest ``keep`` step files.

    ``latest.pt`` is a file of its own (a copy of the step file, never a link), so replacing one by hand never
    changes the other. With ``claim`` (the run folder's, `clip_ping.io.claim_folder`) every file is recorded as
    the run's before it is written and only recorded step files are removed; a step file put there by hand stays.
    A full disk stops the run with one line; the checkpoints written before are left whole.
    Returns the path of the checkpoint of this step (``latest.pt`` when no step files are kept).
    """
    remove_stale_temporaries(folder) if folder.is_dir() else None  # left by a process killed mid-save
    step_path = folder / f"step_{step:07d}.pt"
    latest = folder / "latest.pt"
    if claim is not None:
        prefix = folder.relative_to(claim.folder).as_posix()
        claim.files([f"{prefix}/latest.pt"] + ([f"{prefix}/{step_path.name}"] if keep > 0 else []))
    try:
        if keep > 0:
            atomic_torch_save(state, step_path)
            atomic_copy(step_path, latest)  # a copy costs less than a second serialisation
        else:
            atomic_torch_save(state, latest)
    except DiskFull as exc:
        intact = f"the previous checkpoint {latest} is intact" if latest.is_file() else "no checkpoint was written yet"
        raise DiskFull(str(exc).replace("nothing was half-written", intact)) from None
    step_files = sorted(folder.glob("step_*.pt"), key=lambda p: int(_STEP_FILE.search(p.name).group(1)))
    if claim is not None:  # only the run's own count and go: a step file copied in by hand is kept
        step_files = [p for p in step_files if claim.holds(f"{prefix}/{p.name}")]
    for old in step_files[:-keep] if keep > 0 else step_files:
        if claim is None:
            old.unlink(missing_ok=True)
        else:
            claim.remove(f"{prefix}/{old.name}")
    return step_path if keep > 0 else latest


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """``latest`` -> the run's latest checkpoint (None if the run has none yet); else a path."""
    if resume == "latest":
        latest = run_dir / "checkpoints" / "latest.pt"
        return latest if latest.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise DataError(f"checkpoint to resume from not found: {path}")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's tensors and plain values, read without running code (`clip_ping.io.load_torch_file`)."""
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise DataError(f"{path} is not a clip-ping checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state


def numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as tensors and plain values, which the safe loader reads (not numpy arrays)."""
    return _plain_numpy_rng_state(np.random.get_state())


def _plain_numpy_rng_state(state: Any) -> dict[str, Any]:
    """``np.random.get_state()``'s tuple (which holds an ndarray) as a tensor and plain values."""
    name, keys, pos, has_gauss, cached = state
    return {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: Any) -> None:
    """Restore what `numpy_rng_state` saved."""
    np.random.set_state((state["bit_generator"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


def plain(value: Any) -> Any:
    """``value`` in the types the safe loader reads: dicts, lists, tuples, str, int, float, bool, None and
    tensors (numpy arrays become tensors, numpy scalars numbers, any other object its ``str``)."""
    if isinstance(value, dict):
        return {k if isinstance(k, (int, str)) else str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list) or (isinstance(value, tuple) and type(value) is not tuple):  # a namedtuple: a list
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def convert_trusted_checkpoint(source: Path, out: Path) -> dict[str, Any]:
    """Rewrite a checkpoint that only the unsafe loader reads (an earlier clip-ping's) in the safe form.

    This *runs the file's pickled code*: only for a file the user trusts and names explicitly.
    """
    forced = os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)  # set by the CLI for every other load
    try:
        state = torch.load(source, map_location="cpu", weights_only=False)  # trusted-load: the user vouched for it
    except Exception as exc:
        raise DataError(f"cannot read checkpoint {source}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    finally:
        if forced is not None:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = forced
    if not isinstance(state, dict):
        raise DataError(f"{source} is not a clip-ping checkpoint (it holds a {type(state).__name__}, not a dict)")
    rng = state.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        rng = {**rng, "numpy": _plain_numpy_rng_state(rng["numpy"])}
        state = {**state, "rng": rng}
    safe = plain(state)
    atomic_torch_save(safe, out)
    load_torch_file(out)  # proves the result reads safely
    return safe


@dataclasses.dataclass
class ConvertCheckpointConfig(Config):
    """`clip-ping convert-checkpoint`: an earlier checkpoint rewritten in the form loaded without running code."""

    checkpoint: str = option("", "the checkpoint file to convert (it is read with the unsafe loader: trust it first)")
    out: str | None = option(None, "where to write the converted checkpoint (default: NAME.safe.pt beside it; "
                                   "never an existing file)")
    trust_this_file: bool = option(False, "confirm that you trust the file: unpickling it runs any code it holds")

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("give the checkpoint to convert: --checkpoint FILE")


def convert_checkpoint(cfg: ConvertCheckpointConfig) -> str:
    """Convert ``cfg.checkpoint`` (only with ``--trust-this-file``) into a new file; returns what was written."""
    source = Path(cfg.checkpoint)
    if not source.is_file():
        raise DataError(f"checkpoint not found: {source}")
    out = Path(cfg.out) if cfg.out else source.with_name(f"{source.stem}.safe{source.suffix or '.pt'}")
    if not cfg.trust_this_file:
        raise ConfigError(f"converting {source} unpickles it, which runs any code it holds; if you trust the file, "
                          "pass --trust-this-file")
    if out.exists():
        raise ConfigError(f"{out} exists; clip-ping does not overwrite it: pass another --out")
    convert_trusted_checkpoint(source, out)
    return f"wrote {out}: it loads without running code (e.g. --resume {out})"


def settings_that_differ(saved: dict[str, Any], cfg: Any) -> str:
    """'--key saved -> now' for the settings that shape a run's training (`RESUME_FIXED`)."""
    from .train_config import RESUME_FIXED  # here: the training config imports far more than this module needs

    keys = [f.name for f in dataclasses.fields(cfg) if f.name in RESUME_FIXED and f.name not in ("data", "banks")]
    return ", ".join(f"--{k.replace('_', '-')} {saved[k]} -> {getattr(cfg, k)}" for k in keys
                     if k in saved and saved[k] != getattr(cfg, k))


def objective_state_of_v1(state: dict[str, Any]) -> dict[str, Any]:
    """The objective state of a checkpoint written before objectives existed (heads, queue and memory at top level)."""
    if state.get("guidance") is None:
        return {}
    converted: dict[str, Any] = {f"heads.{k}": t for k, t in state["guidance"].items()}
    converted["_extra_state"] = {"source": state.get("queue"), "targets": state.get("student_memory")}
    return converted
