"""The table contract: one opener for CSV, shards and image folders, one image decoder (paths and bytes)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_ping.data.convert import ConvertConfig, convert
from clip_ping.data.images import load_image
from clip_ping.data.pairs import PairDataset
from clip_ping.data.stream import ShardStream
from clip_ping.data.table import PairSource, open_table
from clip_ping.errors import DataError


def rotated_jpeg(path: Path) -> None:
    """A 30 x 10 JPEG, left half red, whose EXIF says: rotate 90 degrees clockwise to show it (orientation 6)."""
    im = Image.new("RGB", (30, 10), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 15, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, format="JPEG", exif=exif.tobytes(), quality=95)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rotated_jpeg(root / "images" / "rot.jpg")
    lines = ["filepath,caption,kind"]
    for k in range(6):
        Image.new("RGB", (8, 8), (40 * k, 10, 200)).save(root / "images" / f"{k}.png")
        lines.append(f"images/{k}.png,picture {k},{'odd' if k % 2 else 'even'}")
    lines.append("images/rot.jpg,a rotated photo,even")
    for split in ("train", "val", "test"):
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (root / "dataset.json").write_text(json.dumps(
        {"name": "t", "tasks": {"kind": {"column": "kind", "classes": ["even", "odd"], "templates": ["{} one."]}}}))
    return root


@pytest.fixture()
def shard_data(data: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    convert(ConvertConfig(src=str(data), out=str(out), to="shards", samples_per_shard=3))
    return out


def test_one_opener_reads_every_form_as_the_same_rows(data: Path, shard_data: Path, tmp_path: Path) -> None:
    folders = tmp_path / "folders"
    for k, kind in enumerate(["cats", "cats", "dogs"]):
        (folders / kind).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (k, 0, 0)).save(folders / kind / f"{k}.png")
    csv_file, csv_dir = open_table(data / "train.csv"), open_table(data, "train")
    shards_dir, descriptor = open_table(shard_data, "train"), open_table(shard_data / "train.shards.json")
    images = open_table(folders, "train")
    for table in (csv_file, csv_dir, shards_dir, descriptor, images):
        assert isinstance(table, PairSource)
        assert len(table.image_ids) == len(table) == len(table.captions)
    assert csv_file.captions == csv_dir.captions == shards_dir.captions == descriptor.captions
    assert shards_dir.labels == csv_dir.labels
    assert images.labels == {"class": ["cats", "cats", "dogs"]} and len(set(images.image_ids)) == 3
    for i in range(len(csv_dir)):
        assert shards_dir.read_image_bytes(i) == csv_dir.read_image_bytes(i)


def test_a_missing_split_names_every_form_it_looked_for(data: Path) -> None:
    (data / "val.csv").unlink()
    with pytest.raises(DataError, match=r"matches no layout for split 'val' \(val\.csv/val\.tsv: none; val\.shards\.json: none; "
                                       r"image folders: not tried, the folder stores its splits as tables"):
        open_table(data, "val")


def test_exif_orientation_is_applied_to_paths_and_bytes_alike(data: Path, shard_data: Path) -> None:
    path = data / "images" / "rot.jpg"
    from_path, from_bytes = load_image(path), load_image(path.read_bytes(), "rot")
    assert from_path.size == from_bytes.size == (10, 30)  # turned upright
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))
    top = np.asarray(from_path)[2, 5]
    assert top[0] > 200 and top[2] < 60  # the red half is on top once turned clockwise


def test_training_and_extraction_see_the_same_pixels_from_shards(data: Path, shard_data: Path) -> None:
    """The student's loaders (random access and streaming) and the teacher's decoder give one image."""
    csv_table, shard_table = open_table(data, "train"), open_table(shard_data, "train")
    row = csv_table.captions.index("a rotated photo")

    def as_tensor(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())

    teacher_view = as_tensor(load_image(shard_table.read_image_bytes(row)))
    random_access = PairDataset(shard_table, as_tensor)[row]["image"]
    streamed = {s["index"]: s["image"] for s in ShardStream(shard_table, as_tensor) if s is not None}[row]
    csv_view = PairDataset(csv_table, as_tensor)[row]["image"]
    assert teacher_view.shape == (30, 10, 3)
    for view in (random_access, streamed, csv_view):
        assert torch.equal(view, teacher_view)


def test_evaluation_reads_a_shard_folder_like_its_csv_folder(data: Path, shard_data: Path, tiny_model) -> None:
    from clip_ping.evaluation.runner import evaluate

    model, tokenizer, preprocess = tiny_model
    kwargs = dict(batch_size=4, workers=0, linear_probe=True, probe_max_train=10, progress=False)
    from_csv = evaluate(model, tokenizer, preprocess, data, "test", **kwargs)
    from_shards = evaluate(model, tokenizer, preprocess, shard_data, "test", **kwargs)
    for key in ("n_images", "n_texts", "zeroshot", "retrieval", "linear_probe"):
        assert from_shards[key] == from_csv[key], key
    assert from_shards["n_images"] == 7


def test_a_bytes_decode_error_names_the_sample() -> None:
    with pytest.raises(DataError, match="shard-000.tar:000007") as info:
        load_image(io.BytesIO(b"nope").getvalue(), "shard-000.tar:000007")
    assert "BytesIO" not in str(info.value)


def test_neighbour_page_reads_a_shard_folder(shard_data: Path) -> None:
    """`clip-ping neighbors show --data SHARDS/` (the images live in tars: they are embedded)."""
    from conftest import write_random_bank

    from clip_ping.cli import main

    write_random_bank(shard_data, dims=(8, 8))
    assert main(["neighbors", "show", "--data", str(shard_data), "--samples", "4", "--no-embed"]) == 0
    page = (shard_data / "banks" / "neighbors.html").read_text()
    assert page.count('src="data:image/jpeg;base64,') == 12  # each sample, its p and its q
    assert page.count('<div class="cap">') == 12


def test_tasks_of_a_shard_folder_without_dataset_json_come_from_its_labels(shard_data: Path) -> None:
    from clip_ping.data.dataset_info import read_dataset_info

    (shard_data / "dataset.json").unlink()
    tasks = read_dataset_info(shard_data)["tasks"]
    assert tasks["kind"]["classes"] == ["even", "odd"] and "{}" in tasks["kind"]["templates"][0]
