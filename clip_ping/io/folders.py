"""Folders that hold only what clip-ping wrote.

Every command that writes a folder first calls `claim_folder` (or
`claim_files`, for a command that adds named files to a folder of the user's)
with the kind of thing it writes (``run``, ``bank``, ``dataset``...). The rule,
here and nowhere else:

* a command writes only into a folder that is empty, or that carries
  clip-ping's marker (``.clip-ping.json``) of the same kind;
* before a file is written its name is recorded in the marker (`FolderClaim.file`),
  and a file that exists but is not recorded is never written over: the command
  stops with one line naming it;
* ``--overwrite`` (and the removal of old checkpoints) deletes only files the
  marker records.

Folders written by clip-ping before the marker existed are recognised by a
``legacy`` function per kind (a bank by its manifest, a run by its
config.yaml...), which names the files that are clip-ping's; they are recorded
and the folder is used as before. A folder that matches nothing is refused.

A long writer (training, extraction, neighbour search) also takes the folder's
lock (``.clip-ping.lock``, `fcntl.flock`): the system releases it when the
process ends however it ends, and a second writer is refused with the holder's PID.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from ..errors import DataError
from .atomic import atomic_write_json

log = logging.getLogger(__name__)

MARKER = ".clip-ping.json"
LOCK = ".clip-ping.lock"
_OWN_NAMES = (MARKER, LOCK)
_MARKER_FORMAT = 1

Legacy = Callable[[Path], "list[str] | None"]


def _relative(name: str) -> str:
    """A recorded name: a relative POSIX path inside the folder (``sub/`` for a folder that is wholly clip-ping's)."""
    trailing = name.endswith("/")
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise ValueError(f"not a name inside a folder: {name!r}")
    return "/".join(parts) + ("/" if trailing else "")


def _read_marker(folder: Path) -> dict[str, Any]:
    path = folder / MARKER
    if not path.is_file():
        return {"format": _MARKER_FORMAT, "kinds": {}}
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        kinds = marker["kinds"]
        if not isinstance(kinds, dict) or not all(isinstance(v, list) for v in kinds.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{path} is damaged, so clip-ping cannot tell which files in {folder} are its own; "
                        "choose another folder (or delete that folder yourself)") from None
    return marker


def _visible_entries(folder: Path) -> list[str]:
    """What the folder holds, less clip-ping's own marker, lock and temporaries."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in _OWN_NAMES and not (p.name.startswith(".") and ".tmp" in p.name))


def _covered(name: str, recorded: Iterable[str]) -> bool:
    """Whether the top-level entry ``name`` is wholly clip-ping's: recorded as a file or folder, or a folder all of
    whose files are recorded."""
    recorded = list(recorded)
    if name in recorded or f"{name}/" in recorded:
        return True
    return any(r.startswith(f"{name}/") for r in recorded)


class FolderClaim:
    """A folder a command may write: records each file before it is written, removes only recorded files."""

    def __init__(self, folder: Path, kind: str, marker: dict[str, Any], lock_file: Any = None) -> None:
        self.folder, self.kind, self._marker, self._lock_file = folder, kind, marker, lock_file

    # -- what is recorded
    @property
    def recorded(self) -> list[str]:
        return list(self._marker["kinds"].get(self.kind, []))

    def holds(self, name: str) -> bool:
        return _relative(name) in self._marker["kinds"].get(self.kind, [])

    def _save(self) -> None:
        atomic_write_json(self.folder / MARKER, self._marker)

    def files(self, names: Iterable[str]) -> list[Path]:
        """The paths of ``names``, recorded as this command's before anything is written to them.
        A name that exists but is not recorded (the user's file, or another command's) stops the command."""
        own = self._marker["kinds"].setdefault(self.kind, [])
        known = set(own)
        new: list[str] = []
        for name in map(_relative, names):
            if name in known:
                continue
            path = self.folder / name.rstrip("/")
            if path.exists() or path.is_symlink():
                raise DataError(f"{path} was not written by clip-ping {self.kind} (it is not in {self.folder / MARKER}); "
                                "clip-ping never writes over files it did not write: move it away or choose another folder")
            new.append(name)
            known.add(name)
        if new:
            own.extend(new)
            self._save()
        return [self.folder / n.rstrip("/") for n in map(_relative, names)]

    def file(self, name: str) -> Path:
        return self.files([name])[0]

    def remove(self, name: str) -> None:
        """Delete the recorded file or folder ``name`` and forget it; a name not recorded is left alone."""
        name = _relative(name)
        own = self._marker["kinds"].get(self.kind, [])
        if name not in own:
            return
        _delete(self.folder, name)
        own.remove(name)
        self._save()

    def clear(self, kind: str | None = None) -> int:
        """Delete every file recorded under ``kind`` (this claim's by default); returns how many entries."""
        kind = kind or self.kind
        own = self._marker["kinds"].get(kind, [])
        count = len(own)
        for name in sorted(own, key=lambda n: -n.count("/")):
            _delete(self.folder, name)
        if kind in self._marker["kinds"]:
            self._marker["kinds"][kind] = []
            self._save()
        return count

    # -- commands whose file names are decided as they go (shards, converted images)
    def snapshot(self) -> set[str]:
        """Every file under the folder, as relative names (clip-ping's marker and lock left out)."""
        return {p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*")
                if (p.is_file() or p.is_symlink()) and p.name not in _OWN_NAMES}

    def require_only_own(self) -> None:
        """Refuse (one line) when the folder holds a file no kind of clip-ping's records: what comes next would
        be written without naming its files first."""
        recorded = [r for names in self._marker["kinds"].values() for r in names]
        for name in sorted(self.snapshot()):
            if not any(name == r or (r.endswith("/") and name.startswith(r)) for r in recorded):
                raise DataError(f"{self.folder / name} was not written by clip-ping {self.kind}; clip-ping never "
                                "writes over files it did not write: move it away or choose another folder")

    def record_new(self, before: set[str]) -> None:
        """Record the files written since ``snapshot()`` returned ``before``."""
        own = self._marker["kinds"].setdefault(self.kind, [])
        new = sorted(self.snapshot() - before - set(own))
        if new:
            own.extend(new)
            self._save()

    # -- the lock
    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None

    def __enter__(self) -> FolderClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _delete(folder: Path, name: str) -> None:
    path = folder / name.rstrip("/")
    if name.endswith("/"):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    parent = path.parent
    while parent != folder and parent.is_dir() and not any(parent.iterdir()):  # folders the removal emptied
        parent.rmdir()
        parent = parent.parent


def _lock(folder: Path) -> Any:
    import fcntl

    path = folder / LOCK
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise DataError(f"{folder} is in use by another clip-ping process (PID {holder}); wait for it to end, "
                        "or stop it, then run the command again") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def claim_folder(folder: str | Path, kind: str, *, overwrite: bool = False, legacy: Legacy | None = None,
                 joins: tuple[str, ...] = (), any_folder: bool = False, lock: bool = False,
                 option: str = "--out") -> FolderClaim:
    """Claim ``folder`` for a command writing a ``kind``; creates it. See the module's docstring for the rule.

    ``legacy(folder)`` names the files of a folder that an older clip-ping wrote without a marker (None: not
    one). ``joins``: kinds whose folder this kind may share (neighbour tables live in a bank's folder) when
    every file there is clip-ping's. ``any_folder``: the command only adds named files (`FolderClaim.files`
    refuses any that exist and are not its own). ``overwrite`` deletes the files recorded under ``kind``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{option} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{option}: cannot create the {kind} folder {folder} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise DataError(f"{option}: the {kind} folder {folder} is not writable")
    lock_file = None
    try:
        marker = _read_marker(folder)
        kinds = marker["kinds"]
        if kind not in kinds:
            entries = _visible_entries(folder)
            adopted = legacy(folder) if legacy is not None and entries else None
            recorded = [r for names in kinds.values() for r in names]
            if adopted is not None:
                log.info("%s was written by an earlier clip-ping: its %d files are recorded as clip-ping's",
                         folder, len(adopted))
                kinds[kind] = [_relative(n) for n in adopted]
            elif (entries and not any_folder
                  and not (set(kinds) & set(joins) and all(_covered(e, recorded) for e in entries))):
                if kinds:
                    what = f"clip-ping's {' and '.join(sorted(kinds))}, not a {kind}"
                else:
                    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                    what = f"files clip-ping did not write ({shown})"
                raise DataError(f"{option} {folder} holds {what}; choose an empty or new folder "
                                "(clip-ping never writes over or deletes files it did not write)")
            else:
                kinds[kind] = []  # written with the first file recorded: a refused command leaves no marker
            if adopted is not None:
                atomic_write_json(folder / MARKER, marker)
        if lock:  # after the rule: a folder that is not clip-ping's gets no lock file either
            lock_file = _lock(folder)
            marker = _read_marker(folder)  # as the holder before us may have left it
            marker["kinds"].setdefault(kind, [])
        claim = FolderClaim(folder, kind, marker, lock_file)
        if overwrite and claim.recorded:
            log.warning("--overwrite: removing the %d files clip-ping wrote as %s in %s", len(claim.recorded), kind, folder)
            claim.clear()
        return claim
    except BaseException:
        if lock_file is not None:
            lock_file.close()
        raise


def claim_files(folder: str | Path, kind: str, names: Iterable[str], *, legacy: Legacy | None = None,
                option: str = "--out") -> FolderClaim:
    """Claim the files ``names`` in ``folder`` (which may hold anything else) for ``kind``: each must be absent
    or this kind's own. Returns the claim, with the names recorded."""
    claim = claim_folder(folder, kind, legacy=legacy, any_folder=True, option=option)
    claim.files(names)
    return claim
