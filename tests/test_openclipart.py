"""The OpenClipart converter on a fake tree of PNG + SVG files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clip_ping.data.csv_reader import read_pairs
from clip_ping.data.dataset_info import read_dataset_info
from clip_ping.data.openclipart import OpenClipartConfig, clean_keywords, clean_phrase, convert_openclipart
from clip_ping.errors import ConfigError, DataError

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:description>{description}</dc:description>
    <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
    <dc:publisher><cc:Agent><dc:title>public domain</dc:title></cc:Agent></dc:publisher>
  </cc:Work></rdf:RDF></metadata>
  <rect width="10" height="10"/>
</svg>
"""


def picture(root: Path, rel: str, title: str = "", description: str = "", keywords=(), svg: bool = True) -> None:
    png = root / "png" / f"{rel}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), (5, 5, 15, 15))
    image.save(png)
    if svg:
        target = root / "svg" / f"{rel}.svg"
        target.parent.mkdir(parents=True, exist_ok=True)
        lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
        target.write_text(SVG.format(title=title, description=description, keywords=lis))


@pytest.fixture()
def library(tmp_path: Path) -> Path:
    root = tmp_path / "openclipart"
    for k in range(6):
        picture(root, f"animals/birds/bird_{k}_author_01", f"Blue bird {k}", "A small bird on a branch",
                ["", "unsorted", "bird", "Animal", "animal", "a1b2c3d4e5", "clip art", "nature"])
        picture(root, f"food/fruit/apple_{k}", f"apple number {k}", "", ["fruit", "red"])
    picture(root, "animals/cat_sitting_someone__02", "", "", ["cat"], svg=False)  # title from the file name
    picture(root, "unsorted/duplicates/copy_01", "copy", "", [])  # excluded folder
    broken = root / "png" / "food" / "broken.png"
    broken.write_bytes(b"not a png")
    (root / "svg" / "food" / "broken.svg").write_text("<svg><unclosed>")
    return root


def test_convert_openclipart(library: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = OpenClipartConfig(root=str(library), out=str(out), image_size=24, min_class_size=3, workers=1,
                            val_fraction=0.2, test_fraction=0.2)
    summary = convert_openclipart(cfg)
    assert summary["pairs_kept"] == 13
    assert summary["skipped"] == {"excluded_folder": 1, "undecodable_image": 1}
    assert summary["title_from"] == {"svg": 12, "filename": 1}
    assert sum(summary["per_split"].values()) == 13

    tables = {s: read_pairs(out / f"{s}.csv") for s in ("train", "val", "test") if summary["per_split"][s]}
    rows = {Path(p).stem: (c, t.labels["category"][i], t.labels["subcategory"][i])
            for t in tables.values() for i, (p, c) in enumerate(zip(t.filepaths, t.captions))}
    caption, category, sub = rows["bird_0_author_01"]
    assert caption == "Blue bird 0. A small bird on a branch. animal, nature"
    assert (category, sub) == ("animals", "birds")
    assert rows["cat_sitting_someone__02"][0] == "cat sitting someone"
    assert rows["cat_sitting_someone__02"][2] == ""  # no second level

    # Images: composited on white, padded to a square of the requested size.
    with Image.open(next(iter(tables.values())).filepaths[0]) as im:
        assert im.size == (24, 24) and im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 255, 255)

    info = read_dataset_info(out)
    assert info["tasks"]["category"]["classes"] == ["animals", "food"]
    assert info["tasks"]["subcategory"]["classes"] == ["birds", "fruit"]
    assert json.loads((out / "openclipart_summary.json").read_text())["pairs_kept"] == 13

    # Deterministic: the same options give the same tables.
    again = tmp_path / "again"
    convert_openclipart(OpenClipartConfig(**{**cfg.__dict__, "out": str(again)}))
    for split in tables:
        assert (again / f"{split}.csv").read_text() == (out / f"{split}.csv").read_text()


def test_keep_originals_and_caption_fields(library: Path, tmp_path: Path) -> None:
    cfg = OpenClipartConfig(root=str(library), out=str(tmp_path / "o"), image_size=0, workers=1,
                            caption_fields=["title"], val_fraction=0.0, test_fraction=0.0)
    convert_openclipart(cfg)
    table = read_pairs(tmp_path / "o" / "train.csv")
    assert all(str(library) in p for p in table.filepaths)
    assert "apple number 3" in table.captions
    assert not (tmp_path / "o" / "images").exists()


def test_cleaning_helpers() -> None:
    assert clean_phrase("  Unsorted ") == ""
    assert clean_phrase("my_cat 0a1b2c3d http://x.org/y") == "my cat"
    assert clean_keywords(["", "Cat", "cat", "dog", "clipart", "ff00aa11"], "a cat", 5) == ["dog"]


def test_missing_library_explains_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install openclipart-png openclipart-svg"):
        convert_openclipart(OpenClipartConfig(root=str(tmp_path / "none"), out=str(tmp_path / "o")))
    with pytest.raises(ConfigError):
        OpenClipartConfig(caption_fields=["author"]).validate()


def coloured_picture(root: Path, rel: str, colour: tuple[int, int, int], size: int = 20, **meta) -> None:
    picture(root, rel, **meta)
    Image.new("RGB", (size, size), colour).save(root / "png" / f"{rel}.png")


def test_boilerplate_is_dropped_and_linked_groups_never_straddle_splits(tmp_path: Path) -> None:
    root = tmp_path / "openclipart"
    stamp = "Part of the Flat Icon Collection (Wed Aug 25 23:{:02d}:46 2004)"
    things = ["save", "open", "print", "copy", "paste", "undo", "redo", "close"]
    for k, thing in enumerate(things):  # a collection: date-stamped boilerplate title, one shared description sentence
        coloured_picture(root, f"computer/icons/flat_{k}_{thing}_button", (10 * k, 200, 30), title=stamp.format(k),
                         description=f"EPS converted from http://example.org. Shows the {thing} action.",
                         keywords=["icon"])
    for k in range(6):  # a repeated title with identical keywords: one caption group
        coloured_picture(root, f"shapes/stars/star_{k}", (200, 10 * k, 90), title="gramastar", keywords=["stars"])
    for k in range(12):  # ordinary, distinct pictures
        coloured_picture(root, f"animals/pet_{k}", (5 * k, 5 * k, 250), title=f"Pet animal {chr(97 + k)}",
                         keywords=["pet"])
    coloured_picture(root, "animals/pet_twin", (0, 0, 250), size=40, title="A twin of pet a, twice the size")
    out = tmp_path / "out"
    cfg = OpenClipartConfig(root=str(root), out=str(out), image_size=16, workers=1, min_class_size=2,
                            val_fraction=0.3, test_fraction=0.3, boilerplate_min_files=5, max_eval_group=10)
    convert_openclipart(cfg)
    rows = {}
    for split in ("train", "val", "test"):
        table = read_pairs(out / f"{split}.csv")
        for path, caption in zip(table.filepaths, table.captions):
            rows[Path(path).stem] = (caption, split)
    # the collection title and the shared sentence are gone; the title comes from the file name
    assert rows["flat_3_copy_button"][0] == "flat copy button. Shows the copy action. icon"
    assert not any("Flat Icon" in c or "EPS converted" in c for c, _ in rows.values())
    # captions that are still identical are one group, in one split
    stars = {rows[f"star_{k}"] for k in range(6)}
    assert len({c for c, _ in stars}) == 1 and len({s for _, s in stars}) == 1
    # the same image at twice the size stays with its original
    assert rows["pet_twin"][1] == rows["pet_0"][1]
    info = read_dataset_info(out)
    stats = info["statistics"]
    assert stats["test"]["rows_whose_caption_is_in_train"] == 0 and stats["val"]["rows_whose_caption_is_in_train"] == 0
    assert stats["test"]["images_also_in_train"] == 0
    assert sum(stats[s]["rows"] for s in ("train", "val", "test")) == 27
    assert max(stats[s]["largest_caption_group"] for s in ("train", "val", "test")) == 6
