"""Feature banks: row alignment, duplicates, undecodable images, resume, multi-process, open_banks.

The mechanics are tested with two tiny deterministic teachers registered here
(cheap, so every run takes well under a second); the real default teachers are
exercised in test_teachers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from clip_ping.banks import (
    ExtractConfig,
    FeatureBanks,
    duplicate_groups_of_captions,
    duplicate_groups_of_hashes,
    extract_banks,
    open_banks,
)
from clip_ping.data.csv_reader import read_pairs
from clip_ping.data.images import load_image
from clip_ping.errors import ConfigError, DataError
from clip_ping.teachers import ImageTeacher, TextTeacher, register_image_teacher, register_text_teacher

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent


# --------------------------------------------------------------------------- tiny teachers


@register_image_teacher("tiny-image")
class TinyImage(ImageTeacher):
    """8x8 thumbnail times a fixed random matrix. ``TINY_SLEEP`` (s) slows each batch down."""

    def __init__(self, device: str = "cpu") -> None:
        self.name, self.dim, self.device = "tiny-image", 16, device
        self.weight = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(0))

    def transform(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img.resize((8, 8), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(float(os.environ.get("TINY_SLEEP", "0")))
        return images.flatten(1) @ self.weight


@register_text_teacher("tiny-text")
class TinyText(TextTeacher):
    """Character counts folded into 8 buckets (deterministic, distinct captions differ)."""

    def __init__(self, device: str = "cpu") -> None:
        self.name, self.dim, self.device = "tiny-text", 8, device

    def _forward(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 8)
        for i, text in enumerate(texts):
            for j, byte in enumerate(text.encode()):
                out[i, (byte + j) % 8] += 1 + byte % 7
        return out


class InjectedCrash(RuntimeError):
    pass


class FailAfter:
    """Wraps a teacher; its encode raises on call number ``calls + 1`` (an injected crash)."""

    def __init__(self, teacher, calls: int) -> None:
        self.teacher, self.left = teacher, calls
        self.name, self.dim, self.transform = teacher.name, teacher.dim, getattr(teacher, "transform", None)

    def encode(self, x):
        if self.left == 0:
            raise InjectedCrash("injected crash")
        self.left -= 1
        return self.teacher.encode(x)


# --------------------------------------------------------------------------- data


def make_pairs(root: Path, n: int = 30, seed: int = 0, name: str = "train.csv") -> Path:
    """n pairs with: row 5 = a byte copy of row 2's image, row 9 = the same file as row 1,
    row 7 = row 3's caption with other whitespace, row 11 = an undecodable image."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = img_dir / f"{seed}_{i:03d}.png"
        im = Image.new("RGB", (20, 16), tuple(int(c) for c in rng.integers(0, 255, 3)))
        ImageDraw.Draw(im).ellipse([2 + i % 5, 2, 12 + i % 7, 12], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im.save(path)
        rows.append([f"images/{path.name}", f"picture number {i} of set {seed}"])
    shutil.copyfile(root / rows[2][0], img_dir / f"{seed}_copy.png")
    rows[5][0] = f"images/{seed}_copy.png"
    rows[9][0] = rows[1][0]
    rows[7][1] = "  picture number 3   of set " + str(seed)
    (img_dir / f"{seed}_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really an image")
    rows[11][0] = f"images/{seed}_broken.png"
    csv = root / name
    csv.write_text("filepath,caption\n" + "".join(f'{p},"{c}"\n' for p, c in rows))
    return csv


@pytest.fixture
def pairs(tmp_path):
    return make_pairs(tmp_path / "data")


def tiny_cfg(data: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(data=str(data), out=str(out), image_teacher="tiny-image", text_teacher="tiny-text",
                batch_size=3, chunk_size=7, workers=0)
    base.update(kw)
    return ExtractConfig(**base)


BANK_ARRAYS = ("image.npy", "text.npy", "valid.npy", "image_group.npy", "text_group.npy")


def assert_same_bank(a: Path, b: Path) -> None:
    for name in BANK_ARRAYS:
        x, y = np.load(a / name), np.load(b / name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for key in ("started", "created", "processes", "fingerprint"):
        ma.pop(key), mb.pop(key)
    assert ma == mb


@pytest.fixture
def reference(pairs, tmp_path):
    """The bank of an uninterrupted single-process run."""
    return extract_banks(tiny_cfg(pairs, tmp_path / "reference"))


# --------------------------------------------------------------------------- alignment


def test_rows_line_up_with_the_table(pairs, reference):
    table = read_pairs(pairs)
    banks = open_banks(reference, table)
    image_teacher, text_teacher = TinyImage(), TinyText()
    assert len(banks) == len(table) == 30
    assert banks.image.dtype == np.float16 and banks.image.shape == (30, 16) and banks.text.shape == (30, 8)
    for i in range(len(table)):
        want_text = F.normalize(text_teacher.encode([table.captions[i]]), dim=-1)[0]
        assert torch.allclose(torch.from_numpy(banks.text[i].astype(np.float32)), want_text, atol=1e-3), i
        if i == 11:
            continue
        img = image_teacher.transform(load_image(table.filepaths[i]))
        want_image = F.normalize(image_teacher.encode(img[None]), dim=-1)[0]
        assert torch.allclose(torch.from_numpy(banks.image[i].astype(np.float32)), want_image, atol=1e-3), i
    norms = np.linalg.norm(banks.text.astype(np.float32), axis=1)
    assert np.allclose(norms, 1, atol=1e-3)
    m = banks.manifest
    assert m["count"] == 30 and m["dtype"] == "float16" and m["normalised"] is True
    assert m["precision"] == "fp32" and m["teacher_image_size"] is None
    assert m["teachers"] == {"image": {"name": "tiny-image", "dim": 16}, "text": {"name": "tiny-text", "dim": 8}}
    assert m["data_fingerprint"] == table.fingerprint() and m["chunk_size"] == 7
    assert len(m["fingerprint"]) == 64 and banks.fingerprint() == m["fingerprint"]
    assert not (reference / ".extract").exists()


def test_undecodable_image_keeps_its_row(pairs, reference):
    banks = open_banks(reference)
    assert banks.valid.dtype == bool
    assert not banks.valid[11] and banks.valid.sum() == 29
    assert not banks.image[11].any()  # a zero row, not a neighbour's features
    assert banks.text[11].any()  # its caption is still there
    assert banks.manifest["skipped"]["undecodable_images"] == 1
    # the rows after it are still their own (not shifted by one)
    assert not np.array_equal(banks.image[12], banks.image[13])


def test_duplicates_share_group_ids(reference):
    banks = open_banks(reference)
    ig, tg = np.asarray(banks.image_group), np.asarray(banks.text_group)
    assert ig.dtype == np.int64 and tg.dtype == np.int64
    assert ig[5] == ig[2] == 2 and ig[9] == ig[1] == 1  # byte copy and same path
    assert tg[7] == tg[3] == 3
    others = [i for i in range(30) if i not in (5, 9)]
    assert all(ig[i] == i for i in others)
    assert all(tg[i] == i for i in range(30) if i != 7)


def test_group_helpers():
    h = np.array([[1, 2], [3, 4], [1, 2], [3, 4], [0, 0]], dtype=np.uint8)
    assert duplicate_groups_of_hashes(h).tolist() == [0, 1, 0, 1, 4]
    assert duplicate_groups_of_captions(["a b", "c", " a  b ", "A b"]).tolist() == [0, 1, 0, 3]


def test_dataloader_workers_give_the_same_bank(pairs, reference, tmp_path):
    out = extract_banks(tiny_cfg(pairs, tmp_path / "workers", workers=2))
    assert_same_bank(reference, out)


def test_float32_banks(pairs, tmp_path):
    banks = open_banks(extract_banks(tiny_cfg(pairs, tmp_path / "f32", dtype="float32")))
    assert banks.image.dtype == np.float32 and banks.manifest["dtype"] == "float32"


# --------------------------------------------------------------------------- resume


def test_resume_after_a_crash_mid_chunk(pairs, reference, tmp_path):
    out = tmp_path / "crashed"
    cfg = tiny_cfg(pairs, out)
    # 3 batches per chunk of 7: the crash comes during the 2nd batch of chunk 1.
    with pytest.raises(InjectedCrash):
        extract_banks(cfg, image_teacher=FailAfter(TinyImage(), 4))
    done = sorted(p.name for p in (out / ".extract").glob("chunk_*.done"))
    assert done == ["chunk_00000000.done"]  # the partial chunk 1 is not marked
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="unfinished.*1 of 5 chunks.*clip-ping extract"):
        open_banks(out)
    # Whatever a killed run left in unfinished rows must not survive the resume.
    for name in ("image.npy", "text.npy"):
        arr = np.load(out / name, mmap_mode="r+")
        arr[7:] = 9.0
        arr.flush()
    extract_banks(cfg)
    assert_same_bank(reference, out)


def test_resume_after_a_crash_while_finishing(pairs, reference, tmp_path, monkeypatch):
    import clip_ping.banks.extract as banks_module  # the stage; it finishes the bank with its own names

    def crash(captions):
        raise InjectedCrash("crash after the last chunk")

    out = tmp_path / "crash_at_end"
    with monkeypatch.context() as patched:
        patched.setattr(banks_module, "duplicate_groups_of_captions", crash)
        with pytest.raises(InjectedCrash):
            extract_banks(tiny_cfg(pairs, out))
    assert len(list((out / ".extract").glob("chunk_*.done"))) == 5 and not (out / "manifest.json").exists()
    extract_banks(tiny_cfg(pairs, out))  # nothing left to extract: only the groups and the manifest
    assert_same_bank(reference, out)


KILL_SCRIPT = """
import logging, sys
sys.path.insert(0, {tests!r})
import test_banks
from clip_ping.banks import extract_banks
extract_banks(test_banks.tiny_cfg({data!r}, {out!r}, chunk_size=4, batch_size=2, workers={workers}))
"""


def test_resume_after_sigkill(pairs, tmp_path):
    reference = extract_banks(tiny_cfg(pairs, tmp_path / "ref4", chunk_size=4, batch_size=2))
    out = tmp_path / "killed"
    script = tmp_path / "extract.py"
    script.write_text(KILL_SCRIPT.format(tests=str(TESTS_DIR), data=str(pairs), out=str(out), workers=1))
    env = dict(os.environ, TINY_SLEEP="0.15", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 60
        while len(list((out / ".extract").glob("chunk_*.done"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the child made no progress"
            time.sleep(0.02)
        time.sleep(0.1)  # somewhere inside the next chunk
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its DataLoader worker
        proc.wait()
    n_done = len(list((out / ".extract").glob("chunk_*.done")))
    assert 2 <= n_done < 8 and not (out / "manifest.json").exists()
    extract_banks(tiny_cfg(pairs, out, chunk_size=4, batch_size=2))
    assert_same_bank(reference, out)


# --------------------------------------------------------------------------- refusing and reopening


def test_other_data_or_teachers_are_refused_unless_overwrite(pairs, reference, tmp_path):
    other = make_pairs(tmp_path / "other", n=20, seed=1)
    with pytest.raises(DataError, match="other data or teachers.*--overwrite"):
        extract_banks(tiny_cfg(other, reference))
    with pytest.raises(DataError, match="dtype"):
        extract_banks(tiny_cfg(pairs, reference, dtype="float32"))
    # the same request again: complete, nothing recomputed
    before = (reference / "manifest.json").read_text()
    extract_banks(tiny_cfg(pairs, reference))
    assert (reference / "manifest.json").read_text() == before
    extract_banks(tiny_cfg(other, reference, overwrite=True))
    assert open_banks(reference, read_pairs(other)).manifest["count"] == 20


def test_precision_and_teacher_image_size_make_another_bank(pairs, reference, tmp_path):
    with pytest.raises(DataError, match="precision fp32 -> bf16.*--overwrite"):
        extract_banks(tiny_cfg(pairs, reference, precision="bf16"))
    # A bank written before the precision options (no such keys) is an fp32 bank at the teacher's own size,
    # its text teacher in fp32 too.
    manifest = json.loads((reference / "manifest.json").read_text())
    del manifest["precision"], manifest["teacher_image_size"], manifest["text_precision"]
    (reference / "manifest.json").write_text(json.dumps(manifest))
    extract_banks(tiny_cfg(pairs, reference, text_precision="fp32"))  # kept, not refused
    assert "precision" not in json.loads((reference / "manifest.json").read_text())
    with pytest.raises(DataError, match="text_precision fp32 -> bf16"):
        extract_banks(tiny_cfg(pairs, reference, text_precision="bf16"))
    with pytest.raises(DataError, match="teacher_image_size None -> 32"):
        extract_banks(tiny_cfg(pairs, reference, image_teacher="test-tiny-image", teacher_image_size=32))
    # An unfinished extraction of another precision is not resumed either: its rows would mix two precisions.
    out = tmp_path / "unfinished"
    with pytest.raises(InjectedCrash):
        extract_banks(tiny_cfg(pairs, out), image_teacher=FailAfter(TinyImage(), 4))
    with pytest.raises(DataError, match="an unfinished extraction.*precision fp32 -> bf16"):
        extract_banks(tiny_cfg(pairs, out, precision="bf16"))


def test_bf16_bank_is_close_to_the_fp32_bank(pairs, reference, tmp_path):
    bf16 = open_banks(extract_banks(tiny_cfg(pairs, tmp_path / "bf16", precision="bf16")))
    fp32 = open_banks(reference)
    assert bf16.manifest["precision"] == "bf16" and bf16.fingerprint() != fp32.fingerprint()
    a, b = (torch.from_numpy(np.asarray(x.image, dtype=np.float32)) for x in (fp32, bf16))
    ok = torch.from_numpy(np.asarray(fp32.valid))
    cosine = F.cosine_similarity(a[ok], b[ok])
    assert cosine.min() > 0.995 and not torch.equal(a, b)  # close, and really computed in bf16
    assert np.array_equal(bf16.valid, fp32.valid) and np.array_equal(bf16.image_group, fp32.image_group)


def test_teacher_image_size(pairs, tmp_path):
    from clip_ping.teachers import load_image_teacher, transform_at_size

    cfg = tiny_cfg(pairs, tmp_path / "small", image_teacher="test-tiny-image", teacher_image_size=16)
    banks = open_banks(extract_banks(cfg))
    assert banks.manifest["teacher_image_size"] == 16
    teacher = load_image_teacher("test-tiny-image")
    transform = transform_at_size(teacher, 16)
    table = read_pairs(pairs)
    x = torch.stack([transform(load_image(table.filepaths[i])) for i in (0, 4)])
    assert x.shape == (2, 3, 16, 16)
    want = F.normalize(teacher.encode(x), dim=-1)
    assert torch.allclose(torch.from_numpy(banks.image[[0, 4]].astype(np.float32)), want, atol=1e-3)
    full = open_banks(extract_banks(tiny_cfg(pairs, tmp_path / "full", image_teacher="test-tiny-image")))
    assert not np.allclose(full.image[0], banks.image[0], atol=1e-2)  # 40 px by default: another bank
    with pytest.raises(ConfigError, match="tiny-image.*cannot be changed"):  # no torchvision transform to resize
        extract_banks(tiny_cfg(pairs, tmp_path / "x", teacher_image_size=16))


def test_resume_decodes_only_unfinished_chunks(pairs, reference, tmp_path):
    out = tmp_path / "crashed"
    with pytest.raises(InjectedCrash):
        extract_banks(tiny_cfg(pairs, out), image_teacher=FailAfter(TinyImage(), 4))  # chunk 0 (rows 0-6) done
    table = read_pairs(pairs)
    read = []
    original = table.read_image_bytes
    table.read_image_bytes = lambda i: read.append(i) or original(i)
    extract_banks(tiny_cfg(pairs, out), table=table)
    assert sorted(read) == list(range(7, 30))
    assert_same_bank(reference, out)


def test_open_banks_refuses_another_data_set(pairs, reference, tmp_path):
    other = read_pairs(make_pairs(tmp_path / "other", n=30, seed=1))
    with pytest.raises(DataError, match="built for another data set.*re-run clip-ping extract"):
        open_banks(reference, other)
    # same rows, one caption changed: another data set too
    table = read_pairs(pairs)
    table.captions[0] = "changed"
    with pytest.raises(DataError, match="another data set"):
        open_banks(reference, table)


def test_open_banks_without_a_bank(tmp_path):
    with pytest.raises(DataError, match="no feature bank.*clip-ping extract"):
        open_banks(tmp_path)


def test_config_is_validated(pairs, tmp_path):
    with pytest.raises(ConfigError, match="--data"):
        extract_banks(ExtractConfig(out=str(tmp_path)))
    with pytest.raises(ConfigError, match="chunk_size"):
        extract_banks(tiny_cfg(pairs, tmp_path / "x", chunk_size=0))
    with pytest.raises(ConfigError, match="unknown image teacher 'nope'"):
        extract_banks(tiny_cfg(pairs, tmp_path / "x", image_teacher="nope"))
    with pytest.raises(ConfigError, match="'precision': 'fp16' is not one of fp32, bf16"):
        extract_banks(tiny_cfg(pairs, tmp_path / "x", precision="fp16"))
    with pytest.raises(ConfigError, match=r"teacher_image_size' must be in \[16, 2048\], got 8"):
        extract_banks(tiny_cfg(pairs, tmp_path / "x", teacher_image_size=8))


def test_extract_help_names_the_options(capsys):
    from clip_ping.cli import main

    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--precision {fp32,bf16}" in out and "--teacher-image-size TEACHER_IMAGE_SIZE" in out
    assert "(default: fp32)" in out


def test_data_folder_uses_its_train_table(pairs, tmp_path):
    out = extract_banks(tiny_cfg(pairs.parent, tmp_path / "from_dir"))
    assert open_banks(out, read_pairs(pairs)).manifest["count"] == 30


# --------------------------------------------------------------------------- gather


def test_gather_reads_rows_as_float32(reference):
    banks = open_banks(reference)
    rows = np.array([[3, 0], [29, 3]])
    image, text = banks.gather(rows)
    assert image.dtype == torch.float32 and image.shape == (2, 2, 16) and text.shape == (2, 2, 8)
    assert torch.equal(image[1, 0], torch.from_numpy(banks.image[29].astype(np.float32)))
    assert torch.equal(text[0, 1], torch.from_numpy(banks.text[0].astype(np.float32)))
    image_t, _ = banks.gather(torch.tensor([1, 2]))
    assert image_t.shape == (2, 16)
    with pytest.raises(IndexError):
        banks.gather([30])
    assert isinstance(banks.image, np.memmap)


def test_banks_pickle_by_path(reference):
    import pickle

    banks = open_banks(reference)
    blob = pickle.dumps(banks)
    assert len(blob) < 2000  # the path, not the arrays
    again = pickle.loads(blob)
    assert isinstance(again, FeatureBanks) and np.array_equal(again.text, banks.text)


# --------------------------------------------------------------------------- several processes


DIST_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import test_banks
from clip_ping.banks import extract_banks
extract_banks(test_banks.tiny_cfg({data!r}, {out!r}, workers=0))
"""


@pytest.mark.floor
def test_two_processes_equal_one(pairs, reference, tmp_path):
    out = tmp_path / "two"
    script = tmp_path / "dist_extract.py"
    script.write_text(DIST_SCRIPT.format(tests=str(TESTS_DIR), data=str(pairs), out=str(out)))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_bank(reference, out)
    assert json.loads((out / "manifest.json").read_text())["processes"] == 2


def test_banks_of_shards_equal_banks_of_the_same_csv(tmp_path):
    """The same pairs stored as CSV + files or as WebDataset shards give the same bank rows."""
    from clip_ping.data.convert import ConvertConfig, convert
    from clip_ping.data.synth import SynthConfig, generate_synthetic

    data = tmp_path / "csv"
    generate_synthetic(SynthConfig(out=str(data), seed=5, n_train=30, n_val=2, n_test=2, image_size=32, workers=1),
                       progress=False)
    shards = tmp_path / "shards"
    convert(ConvertConfig(src=str(data), out=str(shards), samples_per_shard=7))
    common = dict(image_teacher="tiny-image", text_teacher="tiny-text", workers=0, progress=False, chunk_size=8)
    a = open_banks(extract_banks(ExtractConfig(data=str(data), out=str(tmp_path / "b_csv"), **common)))
    b = open_banks(extract_banks(ExtractConfig(data=str(shards), out=str(tmp_path / "b_shards"), **common)))
    assert len(a) == len(b) == 30
    for name in ("image", "text", "valid", "image_group", "text_group"):
        assert np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name))), name


def test_the_text_teacher_runs_in_bf16_where_bf16_is_native_and_the_image_teacher_in_fp32(pairs, tmp_path,
                                                                                           monkeypatch):
    import clip_ping.banks.extract as banks_mod

    seen: list[tuple[str, str, bool]] = []

    class Recorded:  # what each teacher ran in: its precision and whether bf16 autocast was on
        def _forward(self, x):
            seen.append((self.name, self.precision, torch.is_autocast_enabled("cpu")))
            return super()._forward(x)

    image, text = type("Image", (Recorded, TinyImage), {})(), type("Text", (Recorded, TinyText), {})()
    monkeypatch.setattr(banks_mod, "native_bf16", lambda device: True)
    auto = open_banks(extract_banks(tiny_cfg(pairs, tmp_path / "auto"), image_teacher=image, text_teacher=text))
    assert (auto.manifest["precision"], auto.manifest["text_precision"]) == ("fp32", "bf16")
    assert set(seen) == {("tiny-image", "fp32", False), ("tiny-text", "bf16", True)}
    assert image.precision == text.precision == "fp32"  # each teacher gets its own precision back
    fp32 = open_banks(extract_banks(tiny_cfg(pairs, tmp_path / "fp32", text_precision="fp32")))
    assert (fp32.manifest["precision"], fp32.manifest["text_precision"]) == ("fp32", "fp32")
    # the fp32-text bank is another bank: asking for it under auto is refused, not mixed
    with pytest.raises(DataError, match="text_precision fp32 -> bf16"):
        extract_banks(tiny_cfg(pairs, tmp_path / "fp32"))
    # where bf16 is emulated, auto follows --precision
    monkeypatch.setattr(banks_mod, "native_bf16", lambda device: False)
    assert banks_mod.text_precision(tiny_cfg(pairs, tmp_path / "x")) == "fp32"
    assert banks_mod.text_precision(tiny_cfg(pairs, tmp_path / "x", precision="bf16")) == "bf16"
    assert banks_mod.text_precision(tiny_cfg(pairs, tmp_path / "x", text_precision="bf16")) == "bf16"
    extract_banks(tiny_cfg(pairs, tmp_path / "fp32"))  # auto is fp32 here: the same bank, kept
    with pytest.raises(ConfigError, match="'text_precision': 'fp16' is not one of auto, fp32, bf16"):
        extract_banks(tiny_cfg(pairs, tmp_path / "y", text_precision="fp16"))


def test_the_teacher_transform_split_at_the_batch_gives_the_bank_of_the_whole_transform(pairs, tmp_path, monkeypatch):
    """Workers crop and keep uint8 pixels, the batch is normalised before the teacher: the same bank, bit for bit."""
    from clip_ping.banks import writer as bank_writer

    splits = []
    real_split = bank_writer.split_at_batch
    monkeypatch.setattr(bank_writer, "split_at_batch",
                        lambda transform, rgb_input=False: splits.append(real_split(transform, rgb_input)) or splits[-1])
    settings = dict(image_teacher="test-tiny-image", dtype="float32", workers=1)
    split = extract_banks(tiny_cfg(pairs, tmp_path / "split", **settings))
    assert len(splits) == 1 and splits[0][1] is not None  # the teacher's ToTensor + Normalize ran on the batch
    monkeypatch.setattr(bank_writer, "SPLIT_TRANSFORM", False)
    whole = extract_banks(tiny_cfg(pairs, tmp_path / "whole", **settings))
    assert len(splits) == 1  # the whole transform per sample: not split
    assert_same_bank(split, whole)
    image = np.load(split / "image.npy")
    assert np.abs(image[0] - image[1]).max() > 1e-3  # the rows are different images' features
