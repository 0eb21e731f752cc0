"""Pair tables, image loading, the torch dataset and the synthetic data set (tiny data, made here)."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_ping.data.csv_reader import read_pairs
from clip_ping.data.dataset_info import read_dataset_info
from clip_ping.data.images import ImageDecodeError, load_image
from clip_ping.data.pairs import PairDataset, collate_pairs
from clip_ping.data.synth import SynthConfig, generate_synthetic
from clip_ping.data.synth_scenes import COLOR_WORDS, SHAPE_WORDS
from clip_ping.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- helpers


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Module-level (picklable) transform: fixed 8x8 float tensor."""
    arr = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    """Stands in for open_clip's tokenizer: one row of 4 ints per text."""
    return torch.tensor([[len(t), ord(t[0]), ord(t[-1]), 0] for t in texts], dtype=torch.long)


def make_images(folder: Path, names: list[str], size: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.new("RGB", (size, size), (k * 20 % 256, 100, 50)).save(folder / name)


def write_table(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A folder with a.png..e.png and a train.csv that has one bad row of each kind."""
    make_images(tmp_path / "images", ["a.png", "b.png", "c.png", "d.png", "e.png"])
    write_table(
        tmp_path / "train.csv",
        [
            "filepath,caption,shape",
            "images/a.png,caption a,circle",
            "images/missing.png,caption of a missing file,square",
            "images/b.png,   ,square",  # empty caption
            'images/c.png,"caption c, with a comma",square',
            "images/d.png,too,many,columns",  # malformed
            "images/e.png,caption e,circle",
        ],
    )
    return tmp_path


# ----------------------------------------------------------------------------- read_pairs


def test_read_csv_skips_bad_rows_and_keeps_alignment(data_dir: Path) -> None:
    table = read_pairs(data_dir / "train.csv")
    assert len(table) == 3
    assert table.captions == ["caption a", "caption c, with a comma", "caption e"]
    assert [Path(p).name for p in table.filepaths] == ["a.png", "c.png", "e.png"]
    assert all(Path(p).is_absolute() for p in table.filepaths)
    assert table.labels == {"shape": ["circle", "square", "circle"]}
    assert table.source_rows == [0, 3, 5]
    assert table.skipped == {"missing_image": 1, "empty_caption": 1, "malformed_line": 1}
    assert table.image_path(1) == data_dir / "images" / "c.png"


def test_read_tsv_and_custom_columns(tmp_path: Path) -> None:
    make_images(tmp_path / "img", ["x.png", "y.png"])
    absolute = (tmp_path / "img" / "y.png").resolve()
    write_table(
        tmp_path / "pairs.tsv",
        ["id\ttitle\tpath\tkind", "1\ta, b and c\timg/x.png\tk1", f"2\tsecond one\t{absolute}\tk2"],
    )
    table = read_pairs(tmp_path / "pairs.tsv", image_key="path", caption_key="title", label_keys=["kind"])
    assert table.captions == ["a, b and c", "second one"]
    assert table.labels == {"kind": ["k1", "k2"]}
    assert table.filepaths[1] == str(absolute)
    # Label columns default to every other column.
    assert set(read_pairs(tmp_path / "pairs.tsv", image_key="path", caption_key="title").labels) == {"id", "kind"}
    # An explicit separator wins over the suffix.
    (tmp_path / "pairs.txt").write_text((tmp_path / "pairs.tsv").read_text())
    assert len(read_pairs(tmp_path / "pairs.txt", image_key="path", caption_key="title", separator="\\t")) == 2


def test_read_pairs_errors(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_pairs(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="no caption column 'text'"):
        read_pairs(data_dir / "train.csv", caption_key="text")
    with pytest.raises(DataError, match="no label column"):
        read_pairs(data_dir / "train.csv", label_keys=["color"])
    write_table(tmp_path / "empty.csv", ["filepath,caption", "images/missing.png,hello"])
    with pytest.raises(DataError, match="no usable rows"):
        read_pairs(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_pairs(tmp_path / "blank.csv")


def test_undecodable_caption_and_duplicates(data_dir: Path) -> None:
    raw = b"filepath,caption\nimages/a.png,caf\xe9 latin-1\nimages/b.png,fine\nimages/b.png,fine\n"
    (data_dir / "enc.csv").write_bytes(raw)
    table = read_pairs(data_dir / "enc.csv")
    assert table.captions == ["fine", "fine"] and table.skipped == {"bad_encoding": 1}
    table = read_pairs(data_dir / "enc.csv", drop_duplicates=True)
    assert table.captions == ["fine"] and table.skipped == {"bad_encoding": 1, "duplicate": 1}


def test_fingerprint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    first = read_pairs(data_dir / "train.csv").fingerprint()
    assert first == read_pairs(data_dir / "train.csv").fingerprint()
    # Without the file check the missing image's row is kept: another table, another fingerprint.
    assert first != read_pairs(data_dir / "train.csv", check_files=False).fingerprint()
    # Moving the whole folder keeps it.
    moved = tmp_path_factory.mktemp("moved") / "copy"
    shutil.copytree(data_dir, moved)
    assert read_pairs(moved / "train.csv").fingerprint() == first
    # A changed caption changes it.
    text = (data_dir / "train.csv").read_text()
    (data_dir / "train.csv").write_text(text.replace("caption e", "caption E"))
    assert read_pairs(data_dir / "train.csv").fingerprint() != first
    # So does an image of another size.
    (data_dir / "train.csv").write_text(text)
    Image.new("RGB", (50, 50), "blue").save(data_dir / "images" / "a.png")
    assert read_pairs(data_dir / "train.csv").fingerprint() != first


def test_subset(data_dir: Path) -> None:
    table = read_pairs(data_dir / "train.csv")
    sub = table.subset([2, 0])
    assert sub.captions == ["caption e", "caption a"]
    assert sub.labels["shape"] == ["circle", "circle"]
    assert len(sub) == 2


# ----------------------------------------------------------------------------- images


def test_load_image_composites_transparency_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgba.save(tmp_path / "t.png")
    im = load_image(tmp_path / "t.png")
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 0, 0)
    assert im.getpixel((3, 3)) == (255, 255, 255)  # fully transparent -> background
    assert all(120 <= c <= 135 for c in im.getpixel((1, 0)))  # half black over white -> grey

    la = Image.new("LA", (2, 2), (0, 0))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    im = load_image(tmp_path / "p.png")
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == (0, 255, 0)

    Image.new("L", (2, 2), 77).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").getpixel((0, 0)) == (77, 77, 77)


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    im = Image.new("RGB", (16, 8), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 8, 8))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    im.save(tmp_path / "plain.png")
    shown = load_image(tmp_path / "rotated.jpg")
    assert shown.size == (8, 16)
    assert shown.getpixel((4, 2))[0] > 200 and shown.getpixel((4, 13))[2] > 200  # red on top, blue below
    assert load_image(tmp_path / "plain.png").size == (16, 8)  # no EXIF: as stored


def test_load_image_raises_on_corrupt_and_truncated(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError):
        load_image(tmp_path / "junk.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError):
        load_image(tmp_path / "cut.jpg")
    assert issubclass(ImageDecodeError, DataError)


# ----------------------------------------------------------------------------- torch dataset


@pytest.fixture()
def table_with_corrupt_image(tmp_path: Path):
    names = [f"{k}.png" for k in range(7)]
    make_images(tmp_path / "images", names)
    (tmp_path / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = ["filepath,caption"] + [f"images/{n},caption number {k}" for k, n in enumerate(names)]
    return read_pairs(write_table(tmp_path / "train.csv", lines))


def test_dataset_drops_undecodable_images_and_keeps_indices(table_with_corrupt_image) -> None:
    table = table_with_corrupt_image
    ds = PairDataset(table, to_tensor)
    assert len(ds) == 7 and ds[3] is None and ds.n_decode_errors == 1
    sample = ds[4]
    assert sample["index"] == 4 and sample["text"] == "caption number 4" and sample["image"].shape == (3, 8, 8)

    batch = collate_pairs([ds[i] for i in range(2, 6)])
    assert batch["index"].tolist() == [2, 4, 5]
    assert batch["index"].dtype == torch.long
    assert batch["image"].shape == (3, 3, 8, 8)
    assert batch["text"] == ["caption number 2", "caption number 4", "caption number 5"]
    assert batch["n_skipped"] == 1

    tokens = collate_pairs([ds[i] for i in (0, 1)], tokenizer=fake_tokenizer)["text"]
    assert tokens.shape == (2, 4)
    empty = collate_pairs([None, None])
    assert len(empty["index"]) == 0 and empty["n_skipped"] == 2


def test_dataset_with_tokenizer_stacks_token_rows(table_with_corrupt_image) -> None:
    ds = PairDataset(table_with_corrupt_image, to_tensor, tokenizer=fake_tokenizer)
    batch = collate_pairs([ds[0], ds[3], ds[6]])
    assert batch["text"].tolist() == fake_tokenizer(["caption number 0", "caption number 6"]).tolist()


def test_dataloader_with_two_workers_keeps_index_to_caption(table_with_corrupt_image) -> None:
    table = table_with_corrupt_image
    ds = PairDataset(table, to_tensor)
    seen: dict[int, str] = {}
    skipped = 0
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, num_workers=workers, collate_fn=collate_pairs)
        for batch in loader:
            skipped += batch["n_skipped"]
            for i, caption in zip(batch["index"].tolist(), batch["text"]):
                assert caption == table.captions[i]
                seen.setdefault(i, caption)
    assert sorted(seen) == [0, 1, 2, 4, 5, 6]
    assert skipped == 2  # the corrupt image, once per pass


def test_dataloader_with_workers_and_tokenizer(table_with_corrupt_image) -> None:
    ds = PairDataset(table_with_corrupt_image, to_tensor)
    collate = functools.partial(collate_pairs, tokenizer=fake_tokenizer)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    rows = torch.cat([b["text"] for b in loader])
    assert rows.shape == (6, 4)


# ----------------------------------------------------------------------------- dataset.json


def test_dataset_info_derived_from_label_columns(data_dir: Path) -> None:
    info = read_dataset_info(data_dir)
    assert info["tasks"]["shape"]["classes"] == ["circle", "square"]
    assert all("{}" in t for t in info["tasks"]["shape"]["templates"])


def test_dataset_info_from_json(data_dir: Path) -> None:
    meta = {"name": "tiny", "tasks": {"shape": {"column": "shape", "classes": ["circle", "square"], "templates": ["a {}."]}}}
    (data_dir / "dataset.json").write_text(json.dumps(meta))
    assert read_dataset_info(data_dir) == meta
    (data_dir / "dataset.json").write_text('{"tasks": {"shape": {"classes": ["a", "b"], "templates": ["no slot"]}}}')
    with pytest.raises(DataError, match="template"):
        read_dataset_info(data_dir)
    (data_dir / "dataset.json").write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        read_dataset_info(data_dir)


# ----------------------------------------------------------------------------- synthetic data


def tiny_synth(out: Path, **kw) -> SynthConfig:
    values = dict(out=str(out), seed=3, n_train=24, n_val=6, n_test=6, image_size=32, workers=1)
    values.update(kw)
    return SynthConfig(**values)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synth_is_deterministic(tmp_path: Path) -> None:
    a = generate_synthetic(tiny_synth(tmp_path / "a"), progress=False)
    b = generate_synthetic(tiny_synth(tmp_path / "b", workers=2), progress=False)
    c = generate_synthetic(tiny_synth(tmp_path / "c", seed=4), progress=False)
    files_a, files_b = folder_bytes(a), folder_bytes(b)
    assert len(files_a) == 36 + 4 + 1  # pictures, tables, dataset.json and the marker naming them as clip-ping's
    assert files_a == files_b
    assert files_a["train.csv"] != folder_bytes(c)["train.csv"]
    with Image.open(a / "images" / "train" / "000000.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"


def test_synth_labels_match_captions_and_tasks(tmp_path: Path) -> None:
    out = generate_synthetic(tiny_synth(tmp_path, n_train=150), progress=False)
    info = read_dataset_info(out)
    assert set(info["tasks"]) == {"shape", "color", "count"}
    for split, n in (("train", 150), ("val", 6), ("test", 6)):
        table = read_pairs(out / f"{split}.csv")
        assert len(table) == n and not table.skipped
        assert set(table.labels) == {"shape", "color", "count"}
        for k, caption in enumerate(table.captions):
            shape, color = table.labels["shape"][k], table.labels["color"][k]
            assert shape in info["tasks"]["shape"]["classes"]
            assert color in info["tasks"]["color"]["classes"]
            assert table.labels["count"][k] in info["tasks"]["count"]["classes"]
            assert any(w in caption for pair in SHAPE_WORDS[shape] for w in pair), caption
            assert any(w in caption for w in COLOR_WORDS[color]), caption
    table = read_pairs(out / "train.csv")
    assert len(set(table.labels["shape"])) >= 6 and len(set(table.labels["color"])) >= 8
    assert set(table.labels["count"]) == {"one", "two", "three"}
    assert len(set(table.captions)) > 100  # varied wording


def test_synth_reuses_or_refuses_existing_folder(tmp_path: Path) -> None:
    cfg = tiny_synth(tmp_path / "d")
    generate_synthetic(cfg, progress=False)
    stamp = (tmp_path / "d" / "train.csv").stat().st_mtime_ns
    generate_synthetic(cfg, progress=False)  # same options: kept as is
    assert (tmp_path / "d" / "train.csv").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="other options"):
        generate_synthetic(tiny_synth(tmp_path / "d", seed=9), progress=False)
    generate_synthetic(tiny_synth(tmp_path / "d", seed=9, n_train=10, overwrite=True), progress=False)
    assert len(read_pairs(tmp_path / "d" / "train.csv")) == 10
    assert len(list((tmp_path / "d" / "images" / "train").glob("*.png"))) == 10


def test_synth_config_validation() -> None:
    with pytest.raises(ConfigError):
        SynthConfig(min_objects=3, max_objects=2).validate()
    with pytest.raises(ConfigError):
        SynthConfig(image_size=8).validate()


def test_an_unclosed_quote_is_one_malformed_row_and_the_rows_after_it_keep_their_own_captions(tiny_synth, tmp_path):
    """A caption that opens a quote and never closes it once swallowed the next line: its image got the
    next row's caption and labels, and that row vanished uncounted."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    lines = (data / "train.csv").read_text().splitlines()
    original = read_pairs(data / "train.csv")
    path, rest = lines[4].split(",", 1)
    lines[4] = f'{path},"a green star,star,green,one'  # row 3: the quote is never closed
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    table = read_pairs(data / "train.csv")
    assert table.skipped == {"malformed_line": 1}
    assert len(table) == len(original) - 1
    kept = [i for i in range(len(original)) if i != 3]
    assert table.filepaths == [original.filepaths[i] for i in kept]
    assert table.captions == [original.captions[i] for i in kept]
    for key in original.labels:
        assert table.labels[key] == [original.labels[key][i] for i in kept]


def test_a_quoted_caption_with_a_line_break_is_still_one_row(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text('filepath,caption\na.png,"first line\nsecond line"\na.png,plain\n')
    table = read_pairs(tmp_path / "pairs.csv")
    assert table.captions == ["first line\nsecond line", "plain"] and table.skipped == {}


def test_ctrl_c_stops_a_synth_with_workers_at_once_and_without_tracebacks(tmp_path: Path) -> None:
    """Its workers used to die of the Ctrl-C mid-chunk, and the parent then waited for their chunks forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "synth"
    cmd = [sys.executable, "-m", "clip_ping.cli", "data", "synth", "--out", str(out), "--n-train", "40000",
           "--n-val", "10", "--n-test", "10", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not any(out.rglob("*.png")):  # the workers are drawing
        time.sleep(0.2)
    assert any(out.rglob("*.png")), "synth wrote no image within 60 s"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("synth hung after Ctrl-C")
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert not (out / "dataset.json").exists()  # not marked complete
