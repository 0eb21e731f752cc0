"""Image folders for classification: ``ROOT/<class>/**/<image>`` (one folder per class).

Class names are the folder names made readable ("golden_retriever" ->
"golden retriever"), or come from a names file for folders such as ImageNet's
"n01440764": JSON ``{"folder": "name"}`` or text lines ``folder<TAB or space>name``.

`read_image_folder` returns a `PairTable` (caption "a picture of a <class>.", label
column ``class``) so `PairDataset` and the evaluation code read it like any
other table; `image_folder_to_csv` writes it in the standard data set format
(``<split>.csv`` + ``dataset.json`` with a ``class`` zero-shot task).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, option
from ..errors import ConfigError, DataError
from ..io import claim_files, read_text
from .csv_reader import read_pairs
from .pairs import DEFAULT_TEMPLATES, PairTable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


def readable_name(folder: str) -> str:
    return " ".join(folder.replace("_", " ").replace("-", " ").split()).lower()


def _read_names(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class names file not found: {path}")
    text = read_text(path)
    if path.suffix.lower() == ".json":
        return class_names_json(path, text)
    names = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            names[parts[0]] = parts[1].split(",")[0].strip()  # first synonym of "name, other name"
    return names


def class_names_json(path: Path, text: str) -> dict[str, str]:
    """A class-names JSON, ``{"folder": "class name"}``; one line naming the entry that is not a name."""
    try:
        names = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(names, dict):
        raise DataError(f"{path} must map folder names to class names ({{\"folder\": \"name\"}}), "
                        f"not hold a {type(names).__name__}")
    for folder, name in names.items():
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: entry '{folder}' maps to {json.dumps(name)}, not a class name (a non-empty string)")
    return {str(k): v.strip() for k, v in names.items()}


def read_image_folder(root: str | Path, names_file: str | None = None) -> tuple[PairTable, list[str]]:
    """All images under ``root/<class>/`` (recursively), sorted by class then path; returns (table, classes)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    names = _read_names(names_file) if names_file else {}
    filepaths: list[str] = []
    labels: list[str] = []
    sizes: list[int] = []
    classes: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = names.get(folder.name) or readable_name(folder.name)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            continue  # an empty folder is not a class
        classes.append(name)
        for p in files:
            filepaths.append(os.path.abspath(p))
            labels.append(name)
            sizes.append(p.stat().st_size)
    if len(classes) < 2:
        raise DataError(f"image folder {root} needs at least 2 class folders holding images (found {len(classes)})")
    captions = [f"a picture of {'an' if c[:1] in 'aeiou' else 'a'} {c}." for c in labels]
    table = PairTable(
        source=root.resolve(),
        root=root.resolve(),
        filepaths=filepaths,
        captions=captions,
        labels={"class": labels},
        source_rows=list(range(len(filepaths))),
        skipped={},
        file_sizes=sizes,
    )
    return table, sorted(set(classes), key=classes.index)


@dataclass
class ImageFolderConfig(Config):
    root: str = option("", "folder with one sub-folder of images per class")
    out: str = option("", "output data set folder (default: ROOT itself)")
    split: str = option("test", "split name of the written table", choices=("train", "val", "test"))
    names_file: str = option("", "optional JSON or text file mapping folder names to class names")

    def validate(self) -> None:
        if not self.root:
            raise ConfigError("config key 'root' is required (the image folder)")


def legacy_folder_tables(out: Path) -> list[str] | None:
    """The tables and dataset.json that an earlier ``data folders`` wrote (None when there are none): a
    dataset.json whose only task is its ``class`` task, beside tables with its three columns."""
    try:
        info = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(info, dict) and isinstance(info.get("tasks"), dict) and list(info["tasks"]) == ["class"]):
        return None
    tables = []
    for split in ("train", "val", "test"):
        try:
            with open(out / f"{split}.csv", newline="", encoding="utf-8") as f:
                if next(csv.reader(f), None) == ["filepath", "caption", "class"]:
                    tables.append(f"{split}.csv")
        except (OSError, UnicodeDecodeError):
            continue
    return tables + ["dataset.json"] if tables else None


def image_folder_to_csv(cfg: ImageFolderConfig) -> Path:
    """Write ``OUT/<split>.csv`` and ``OUT/dataset.json`` (task ``class``) for an image folder; returns OUT.
    Run again for another split, it adds that split's table and keeps the dataset.json it wrote."""
    table, classes = read_image_folder(cfg.root, cfg.names_file or None)
    out = Path(cfg.out or cfg.root)
    # the two files only: the folder may be the image folder itself; a table or dataset.json that another
    # command or the user wrote is never written over
    claim_files(out, "image-folder table", [f"{cfg.split}.csv", "dataset.json"], legacy=legacy_folder_tables)
    with open(out / f"{cfg.split}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filepath", "caption", "class"])
        for path, caption, label in zip(table.filepaths, table.captions, table.labels["class"]):
            writer.writerow([os.path.relpath(path, out.resolve()), caption, label])
    meta_path = out / "dataset.json"
    info = json.loads(meta_path.read_text()) if meta_path.is_file() else {"name": Path(cfg.root).resolve().name, "tasks": {}}
    info.setdefault("tasks", {})["class"] = {"column": "class", "classes": classes, "templates": list(DEFAULT_TEMPLATES)}
    meta_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    read_pairs(out / f"{cfg.split}.csv")  # fail now, not later, if the written table does not read back
    return out
