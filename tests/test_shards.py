"""WebDataset shards: writing, indexing, random access, streaming, convert, image folders."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_ping.data.convert import ConvertConfig, convert, write_shards
from clip_ping.data.csv_reader import read_pairs
from clip_ping.data.dataset_info import read_dataset_info
from clip_ping.data.folders import ImageFolderConfig, image_folder_to_csv, read_image_folder
from clip_ping.data.images import load_image
from clip_ping.data.pairs import PairDataset, collate_pairs
from clip_ping.data.shard_index import expand_shards
from clip_ping.data.shards import ShardTable, index_shards, open_shards
from clip_ping.data.stream import ShardStream
from clip_ping.data.table import open_table
from clip_ping.errors import ConfigError, DataError


def to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def png_bytes(color: tuple[int, int, int], size: int = 12, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), color if mode == "RGB" else color + (255,)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def csv_data(tmp_path: Path) -> Path:
    """A data set folder: train.csv (9 rows, one corrupt image, one missing) + val.csv + dataset.json."""
    root = tmp_path / "csvdata"
    (root / "images").mkdir(parents=True)
    lines = ["filepath,caption,kind"]
    for k in range(9):
        (root / "images" / f"{k}.png").write_bytes(png_bytes((k * 25, 40, 200 - k * 20)))
        lines.append(f"images/{k}.png,picture number {k},{'odd' if k % 2 else 'even'}")
    (root / "images" / "4.png").write_bytes(b"corrupt")
    lines.append("images/gone.png,a missing file,odd")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "val.csv").write_text("filepath,caption,kind\nimages/0.png,val picture,even\nimages/1.png,val two,odd\n")
    task = {"column": "kind", "classes": ["even", "odd"], "templates": ["{} one."]}
    (root / "dataset.json").write_text(json.dumps({"name": "t", "tasks": {"kind": task}}))
    return root


def test_write_and_open_shards_keep_rows_and_indices(csv_data: Path, tmp_path: Path) -> None:
    table = read_pairs(csv_data / "train.csv")
    shards = write_shards(table, tmp_path / "sh", "train", samples_per_shard=4)
    assert len(shards.shards) == 3 and len(shards) == len(table) == 9
    reopened = open_shards(tmp_path / "sh" / "train.shards.json")
    assert reopened.captions == table.captions
    assert reopened.labels == table.labels
    assert reopened.fingerprint() == shards.fingerprint()
    for i in (0, 5, 8):
        assert reopened.open_image(i).tobytes() == load_image(table.filepaths[i]).tobytes()
    # Byte-identical shards from the same table.
    again = write_shards(table, tmp_path / "sh2", "train", samples_per_shard=4)
    assert (tmp_path / "sh" / "train-000001.tar").read_bytes() == (tmp_path / "sh2" / "train-000001.tar").read_bytes()
    assert again.fingerprint() == shards.fingerprint()


def test_shard_table_works_with_pair_dataset_and_workers(csv_data: Path, tmp_path: Path) -> None:
    shards = write_shards(read_pairs(csv_data / "train.csv"), tmp_path / "sh", samples_per_shard=4)
    ds = PairDataset(shards, to_tensor)
    assert ds[4] is None  # the corrupt image
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate_pairs)
    seen = {}
    for batch in loader:
        for i, caption in zip(batch["index"].tolist(), batch["text"]):
            seen[i] = caption
    assert seen == {i: shards.captions[i] for i in range(9) if i != 4}


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_indices_are_stable(csv_data: Path, tmp_path: Path, workers: int) -> None:
    shards = write_shards(read_pairs(csv_data / "train.csv"), tmp_path / "sh", samples_per_shard=2)
    stream = ShardStream(shards, to_tensor, shuffle_buffer=4, shuffle_shards=True, seed=1)
    passes = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(stream, batch_size=3, num_workers=workers, collate_fn=collate_pairs)
        order, skipped = [], 0
        for batch in loader:
            skipped += batch["n_skipped"]
            for i, caption in zip(batch["index"].tolist(), batch["text"]):
                assert caption == shards.captions[i]
                order.append(i)
        assert sorted(order) == [i for i in range(9) if i != 4]  # each sample once per epoch
        assert skipped == 1
        passes.append(order)
    # Same seed and epoch -> same order.
    stream.set_epoch(0)
    loader = torch.utils.data.DataLoader(stream, batch_size=3, num_workers=workers, collate_fn=collate_pairs)
    assert [i for b in loader for i in b["index"].tolist()] == passes[0]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_index_foreign_shards_counts_bad_samples(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        add(tar, "s/0001.jpg", png_bytes((255, 0, 0)))  # png bytes with a .jpg name: decoded by content
        add(tar, "s/0001.json", json.dumps({"caption": "red from json", "source": "x"}).encode())
        add(tar, "s/0002.png", png_bytes((0, 255, 0)))
        add(tar, "s/0002.txt", b"   ")  # empty caption
        add(tar, "s/0003.txt", b"no image")  # no image
        add(tar, "s/0004.webp", png_bytes((0, 0, 255)))
        add(tar, "s/0004.txt", b"caf\xe9")  # not UTF-8
        add(tar, "s/0005.png", png_bytes((9, 9, 9)))
        add(tar, "s/0005.txt", "a grey one \u2013 ok".encode())
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        add(tar, "s/0001.png", png_bytes((1, 2, 3)))  # duplicate key
        add(tar, "s/0001.txt", b"dup")
        add(tar, "s/0009.png", png_bytes((4, 5, 6)))
        add(tar, "s/0009.txt", b"last")
    shards = expand_shards(str(tmp_path / "*.tar"))
    assert index_shards(shards, tmp_path / "plain" / "train.shards.json").labels == {}  # a JSON's fields are not labels
    table = index_shards(shards, tmp_path / "out" / "train.shards.json", label_fields=["source"], workers=2)
    assert table.keys == ["s/0001", "s/0005", "s/0009"]
    assert table.captions == ["red from json", "a grey one \u2013 ok", "last"]
    assert table.labels == {"source": ["x", "", ""]}
    assert table.skipped == {"empty_caption": 1, "missing_image": 1, "bad_encoding": 1, "duplicate_key": 1}
    assert table.open_image(0).getpixel((0, 0)) == (255, 0, 0)
    assert table.open_image(2).getpixel((0, 0)) == (4, 5, 6)
    assert expand_shards(str(tmp_path / "{a,b}.tar")) == [tmp_path / "a.tar", tmp_path / "b.tar"]
    with pytest.raises(DataError, match="not found"):
        expand_shards(str(tmp_path / "c.tar"))


def test_changed_or_truncated_shards(csv_data: Path, tmp_path: Path) -> None:
    write_shards(read_pairs(csv_data / "train.csv"), tmp_path / "sh", samples_per_shard=5)
    shard = tmp_path / "sh" / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="changed since it was indexed"):
        open_shards(tmp_path / "sh" / "train.shards.json")
    # Re-indexing the truncated shard keeps the samples before the damage.
    table = index_shards([shard], tmp_path / "re" / "train.shards.json")
    assert 0 < len(table) < 5
    assert table.captions == [f"picture number {k}" for k in range(len(table))]


def test_convert_round_trip(csv_data: Path, tmp_path: Path) -> None:
    summary = convert(ConvertConfig(src=str(csv_data), out=str(tmp_path / "sh"), to="shards", samples_per_shard=3))
    assert summary["splits"]["train"]["kept"] == 9 and summary["splits"]["train"]["skipped"] == {"missing_image": 1}
    assert set(summary["splits"]) == {"train", "val"}
    assert (tmp_path / "sh" / "dataset.json").is_file() and (tmp_path / "sh" / "convert_summary.json").is_file()
    assert isinstance(open_table(tmp_path / "sh", "val"), ShardTable)

    convert(ConvertConfig(src=str(tmp_path / "sh"), out=str(tmp_path / "back"), to="csv"))
    original, back = read_pairs(csv_data / "train.csv"), read_pairs(tmp_path / "back" / "train.csv")
    assert back.captions == original.captions and back.labels == original.labels
    assert [Path(p).read_bytes() for p in back.filepaths] == [Path(p).read_bytes() for p in original.filepaths]
    assert read_dataset_info(tmp_path / "back")["tasks"]["kind"]["classes"] == ["even", "odd"]

    # Foreign shards indexed in place, then used as a split.
    convert(ConvertConfig(src=str(tmp_path / "sh" / "train-*.tar"), out=str(tmp_path / "idx"), to="index"))
    assert open_table(tmp_path / "idx", "train").captions == original.captions

    with pytest.raises(DataError, match="already holds"):
        convert(ConvertConfig(src=str(csv_data), out=str(tmp_path / "sh"), to="shards"))
    with pytest.raises(ConfigError):
        convert(ConvertConfig(src="", out=str(tmp_path / "x")))


# ----------------------------------------------------------------------------- image folders


def test_image_folder_reader(tmp_path: Path) -> None:
    root = tmp_path / "folders"
    for cls, n in (("golden_retriever", 2), ("tabby-cat", 3)):
        (root / cls / "sub").mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", (6, 6), (k, 0, 0)).save(root / cls / ("sub" if k == 2 else "") / f"{k}.png")
    (root / "tabby-cat" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    table, classes = read_image_folder(root)
    assert classes == ["golden retriever", "tabby cat"]
    assert len(table) == 5 and table.labels["class"] == ["golden retriever"] * 2 + ["tabby cat"] * 3
    assert all(c.startswith("a picture of") for c in table.captions)

    out = image_folder_to_csv(ImageFolderConfig(root=str(root), out=str(tmp_path / "as_csv"), split="test"))
    again = read_pairs(out / "test.csv")
    assert again.labels["class"] == table.labels["class"]
    info = read_dataset_info(out)
    assert info["tasks"]["class"]["classes"] == classes
    with pytest.raises(DataError):
        read_image_folder(tmp_path / "nothing")


def test_key_index_finds_every_key_and_survives_hash_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    from clip_ping.data import shard_index

    keys = [f"shard-{i // 7:04d}/{i:09d}" for i in range(500)]
    index = shard_index.KeyIndex(keys)
    assert [index.get(k) for k in keys] == list(range(500))
    assert index.get("shard-9999/not-there") is None
    monkeypatch.setattr(shard_index, "_hash64", lambda key: len(key) % 3)  # nearly every key collides
    crowded = shard_index.KeyIndex(keys)
    assert [crowded.get(k) for k in keys[::37]] == list(range(0, 500, 37))
    assert crowded.get("x") is None


def test_string_column_reads_like_a_list_of_str() -> None:
    from clip_ping.data.shard_index import CodedColumn, StringColumn

    texts = ["", "plain", "caf\u00e9 \u2013 \U0001f600", "bad \udcff byte", *(f"row {i}" for i in range(70_000))]
    col = StringColumn.from_strings(texts)
    assert len(col) == len(texts) and col.nbytes == col.data.nbytes + 8 * (len(texts) + 1)
    assert [col[i] for i in (0, 1, 2, 3, -1)] == [texts[i] for i in (0, 1, 2, 3, -1)]
    assert col[2:6] == texts[2:6] and col[::20_000] == texts[::20_000]
    assert list(col) == texts  # iteration crosses its 64k-row chunks
    assert col.raw(2, 4) == [t.encode("utf-8", "surrogateescape") for t in texts[2:4]] and col.raw(9**9, 9**9 + 1) == []
    assert col == texts and texts == col and col != texts[:-1]
    with pytest.raises(IndexError):
        col[len(texts)]
    exts = CodedColumn.from_strings(["png", "jpg", "png"])
    assert list(exts) == ["png", "jpg", "png"] and exts.codes.dtype == np.uint8 and exts[1:] == ["jpg", "png"]


def test_index_file_is_memory_mapped_and_travels_to_spawned_processes(csv_data: Path, tmp_path: Path) -> None:
    import pickle

    from clip_ping.data.shard_index import StringColumn

    written = write_shards(read_pairs(csv_data / "train.csv"), tmp_path / "sh", samples_per_shard=4)
    info = json.loads((tmp_path / "sh" / "train.shards.json").read_text())
    assert info["format"] == "clip-ping-shards/2" and (tmp_path / "sh" / info["index"]).is_file()
    table = open_shards(tmp_path / "sh")
    assert isinstance(table.captions, StringColumn) and isinstance(table.captions.data.base, np.memmap)
    assert isinstance(table.offsets.base, np.memmap)
    assert table.captions == written.captions and table.fingerprint() == info["fingerprint"]
    # the fingerprint is the one banks were built with before the columns (hashed row by row from str)
    import hashlib

    h = hashlib.sha256()
    for key, caption, size in zip(list(table.keys), list(table.captions), table.sizes.tolist()):
        h.update(f"{key}\0{caption}\0{size}\n".encode("utf-8", "surrogateescape"))
    assert table.fingerprint() == h.hexdigest()
    assert [table.key_to_index.get(k) for k in written.keys] == list(range(len(written)))  # stored, not rebuilt
    blob = pickle.dumps(table)
    assert len(blob) < 1000  # the arrays are mapped again on the other side, not copied
    other = pickle.loads(blob)
    assert other.captions == table.captions and other.open_image(3).tobytes() == table.open_image(3).tobytes()


def test_format_1_csv_index_is_still_read_and_unknown_formats_are_refused(csv_data: Path, tmp_path: Path) -> None:
    import csv

    table = write_shards(read_pairs(csv_data / "train.csv"), tmp_path / "sh", samples_per_shard=4)
    desc = tmp_path / "sh" / "train.shards.json"
    info = json.loads(desc.read_text())
    # the index as version 1 wrote it: a CSV, the descriptor naming it
    with open(tmp_path / "sh" / "train.index.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["key", "shard", "offset", "size", "ext", "caption", "kind"])
        for i in range(len(table)):
            w.writerow([table.keys[i], int(table.shard_ids[i]), int(table.offsets[i]), int(table.sizes[i]),
                        table.exts[i], table.captions[i], table.labels["kind"][i]])
    v1 = {k: v for k, v in info.items() if k not in ("arrays", "exts", "index_bytes")}
    desc.write_text(json.dumps({**v1, "format": "clip-ping-shards/1", "index": "train.index.csv"}))
    old = open_shards(desc)
    assert old.keys == table.keys and old.captions == table.captions and old.labels == table.labels
    assert old.fingerprint() == table.fingerprint() and list(old.exts) == list(table.exts)
    assert old.open_image(5).tobytes() == table.open_image(5).tobytes()
    desc.write_text(json.dumps({**info, "format": "clip-ping-shards/9"}))
    with pytest.raises(DataError, match="format 'clip-ping-shards/9'.*re-index"):
        open_shards(desc)
    desc.write_text(json.dumps(info))
    index = tmp_path / "sh" / info["index"]
    index.write_bytes(index.read_bytes()[:-8])  # cut short
    with pytest.raises(DataError, match="does not match|truncated"):
        open_shards(desc)
