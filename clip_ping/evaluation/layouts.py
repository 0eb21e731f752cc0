"""The evaluation layouts papers report on, each read into one of two forms.

`ClassificationSet` (images, a class id per image, class names, prompt templates)
and `RetrievalSet` (images, captions, the image of each caption). Their
``images`` is table-like (``len``, ``captions``, ``open_image(i)``), so
`clip_ping.data.pairs.PairDataset` and the runner's encoders read it unchanged.

Layouts
-------
- ``folders``: ImageNet-style class folders, ``ROOT/[SPLIT/]<class>/<image>``.
  Class names: ``imagenet`` (open_clip's 1000 ImageNet names, for the 1000
  sorted synset folders), a names file (text: one name per line in sorted folder
  order; JSON: ``{folder: name}``), ``ROOT/classnames.txt`` when present, else
  the folder names made readable. A class folder without images stays a class
  (the classifier is over all classes, as for a partial ImageNet) and is counted.
- ``karpathy``: the Karpathy-split caption JSON of Flickr30K / MSCOCO
  (``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``),
  images under an ``images`` folder. Images missing on disk are counted and skipped.
- ``wds``: clip_benchmark's WebDataset evaluation shards, ``ROOT/classnames.txt``,
  ``ROOT/zeroshot_classification_templates.txt``, ``ROOT/SPLIT/{0..n-1}.tar``
  (``ROOT/SPLIT/nshards.txt``), samples ``<key>.webp|png|jpg`` with ``<key>.cls``
  (class id) or ``<key>.txt`` (captions, one per line, when
  ``ROOT/dataset_type.txt`` says ``retrieval``).

Templates: ``openai`` (OpenAI's 80 ImageNet prompts from
``open_clip.zero_shot_metadata``), ``simple`` (its 7), a file (one per line with
``{}``, or clip_benchmark's ``{c}``), else the layout's own file
(``zeroshot_classification_templates.txt`` or ``templates.txt``), else
clip-ping's default prompts.
"""

from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import load_image
from ..errors import DataError
from ..io import read_text

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
WDS_IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILES = ("zeroshot_classification_templates.txt", "templates.txt")


# --------------------------------------------------------------------------- forms


class ImageFiles:
    """Image files as a table: what `PairDataset` reads (captions are unused placeholders)."""

    def __init__(self, paths: list[str]) -> None:
        self.filepaths = paths
        self.captions = [""] * len(paths)

    @property
    def image_ids(self) -> list[str]:
        return self.filepaths

    def __len__(self) -> int:
        return len(self.filepaths)

    def open_image(self, i: int) -> Image.Image:
        return load_image(self.filepaths[i])


class TarImages:
    """Images inside tar files, read by seeking to each member (random access, so loader workers can share it)."""

    def __init__(self, members: list[tuple[str, int, int]]) -> None:
        self.members = members  # (tar path, data offset, size)
        self.captions = [""] * len(members)
        self.image_ids = [f"{tar}@{offset}" for tar, offset, _ in members]  # distinct per image

    def __len__(self) -> int:
        return len(self.members)

    def open_image(self, i: int) -> Image.Image:
        tar, offset, size = self.members[i]
        with open(tar, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return load_image(data, f"{tar} at byte {offset}")


@dataclass
class ClassificationSet:
    images: Any                      # ImageFiles or TarImages
    labels: np.ndarray               # class id of each image
    classnames: list[str]
    templates: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    cut: list[str] = field(default_factory=list)  # shards cut short: what followed the cut was not read


@dataclass
class RetrievalSet:
    images: Any
    captions: list[str]
    text_to_image: list[int]         # image of each caption
    skipped: dict[str, int] = field(default_factory=dict)
    cut: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- names and templates


def resolve_templates(spec: str | None, root: Path | None = None) -> list[str]:
    """``openai`` / ``simple`` (open_clip's ImageNet prompts), a file, the layout's own file, or the default."""
    from ..data.dataset_info import DEFAULT_TEMPLATES
    from .tasks import read_templates_file

    if spec in ("openai", "simple"):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        return [t("{}") for t in (OPENAI_IMAGENET_TEMPLATES if spec == "openai" else SIMPLE_IMAGENET_TEMPLATES)]
    path = Path(spec) if spec else next((root / n for n in TEMPLATES_FILES if root and (root / n).is_file()), None)
    if path is None:
        return list(DEFAULT_TEMPLATES)
    if path.is_file() and "{c}" in read_text(path):
        # clip_benchmark's files write the class as {c} (str.format); clip-ping's prompts use {}
        return [t.replace("{c}", "{}") for t in _read_lines(path) if not t.startswith("#")]
    return read_templates_file(path)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def resolve_classnames(spec: str | None, folders: list[str], root: Path) -> list[str]:
    """One prompt name per class folder (``folders`` sorted), from ``spec`` or the layout (module docstring)."""
    from ..data.folders import readable_name

    if spec == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
    elif spec:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"class names file not found: {path}")
        if path.suffix.lower() == ".json":
            from ..data.folders import class_names_json

            mapping = class_names_json(path, read_text(path))
            missing = [f for f in folders if f not in mapping]
            if missing:
                raise DataError(f"{path} must map every class folder to a name (missing: {missing[:3]})")
            return [mapping[f] for f in folders]
        names = _read_lines(path)
    elif (root / CLASSNAMES_FILE).is_file():
        spec, names = str(root / CLASSNAMES_FILE), _read_lines(root / CLASSNAMES_FILE)
    else:
        return [readable_name(f) for f in folders]
    if len(names) != len(folders):
        raise DataError(f"class names '{spec}' list {len(names)} classes but {root} has {len(folders)} class folders")
    return names


# --------------------------------------------------------------------------- class folders


def _split_folder(root: Path, split: str | None) -> Path:
    if not root.is_dir():
        raise DataError(f"class-folder data not found: expected the folder {root}")
    return root / split if split and (root / split).is_dir() else root


def read_class_folders(root: str | Path, split: str | None = "test", classnames: str | None = None,
                       templates: str | None = None) -> ClassificationSet:
    """``ROOT/SPLIT/<class>/<image>`` (or ``ROOT/<class>/...``) as a classification set."""
    root = Path(root)
    folder = _split_folder(root, split)
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    if len(class_dirs) < 2:
        raise DataError(f"{folder}: expected class folders ({folder}/<class>/<image>), found {len(class_dirs)}")
    names = resolve_classnames(classnames, [d.name for d in class_dirs], root)
    paths, labels, empty = [], [], 0
    for label, d in enumerate(class_dirs):
        files = sorted(str(p) for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        empty += not files
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{folder}: no images in any of its {len(class_dirs)} class folders")
    if empty:
        log.warning("%s: %d of %d class folders hold no image (kept as classes, no images scored)",
                    folder, empty, len(class_dirs))
    return ClassificationSet(ImageFiles(paths), np.array(labels, dtype=np.int64), names,
                             resolve_templates(templates, root), {"classes_without_images": empty} if empty else {})


# --------------------------------------------------------------------------- Karpathy JSON


def read_karpathy_json(path: str | Path, images: str | Path | None = None, split: str = "test") -> RetrievalSet:
    """The ``split`` images of a Karpathy-split caption JSON (``images``: their folder, default the JSON's)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a Karpathy-split captions JSON file (e.g. dataset_flickr30k.json): {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a Karpathy-split JSON (expected an 'images' list)")
    image_root = Path(images) if images else path.parent
    paths: list[str] = []
    captions: list[str] = []
    text_to_image: list[int] = []
    skipped = {"missing_image": 0, "no_caption": 0}
    for number, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: images[{number}] is a {type(entry).__name__}, not an entry "
                            '({"filename", "split", "sentences"})')
        if entry.get("split") != split:
            continue
        file = image_root / _karpathy_field(path, number, entry, "filepath", "") / \
            _karpathy_field(path, number, entry, "filename")
        texts = [t.strip() for t in _karpathy_sentences(path, number, entry) if t.strip()]
        if not file.is_file():
            skipped["missing_image"] += 1
            continue
        if not texts:
            skipped["no_caption"] += 1
            continue
        text_to_image += [len(paths)] * len(texts)
        captions += texts
        paths.append(str(file))
    skipped = {k: v for k, v in skipped.items() if v}
    if skipped:
        log.warning("%s (%s split): images skipped: %s", path, split, skipped)
    if not paths:
        raise DataError(f"{path}: no '{split}' image with captions found under {image_root} "
                        "(the images folder is the JSON's unless given)")
    return RetrievalSet(ImageFiles(paths), captions, text_to_image, skipped)


def _karpathy_field(path: Path, number: int, entry: dict[str, Any], key: str, default: str | None = None) -> str:
    value = entry.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        shown = "missing" if key not in entry else f"{json.dumps(value)}, not a file name"
        raise DataError(f"{path}: images[{number}] ({entry.get('filename', 'no filename')}): '{key}' is {shown}")
    return value


def _karpathy_sentences(path: Path, number: int, entry: dict[str, Any]) -> list[str]:
    sentences = entry.get("sentences", [])
    texts = []
    for s in sentences if isinstance(sentences, list) else [sentences]:
        text = s.get("raw") or " ".join(map(str, s.get("tokens") or [])) if isinstance(s, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}: images[{number}]: 'sentences' must be a list of {{\"raw\": caption}}, "
                            f"found {json.dumps(s)[:60]}")
        texts.append(text)
    return texts


# --------------------------------------------------------------------------- clip_benchmark WebDataset


def _wds_tars(root: Path, split: str) -> list[Path]:
    folder = root / split
    count_file = folder / "nshards.txt"
    if count_file.is_file():
        count = read_text(count_file).strip()
        if not count.isdigit():
            raise DataError(f"{count_file} holds {count[:40]!r}, not the number of shards")
        tars = [folder / f"{i}.tar" for i in range(int(count))]
    else:
        tars = sorted(folder.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    missing = [t for t in tars if not t.is_file()]
    if not tars or missing:
        raise DataError(f"clip_benchmark WebDataset layout: expected {folder}/nshards.txt and "
                        f"{missing[0] if missing else folder / '0.tar'}")
    return tars


def _read_tar_groups(tar: Path) -> tuple[dict[str, dict[str, Any]], bool]:
    """The members of one tar grouped by key, and whether it is whole. A cut tar (a member's data or the
    end-of-archive block missing) keeps the members that lie wholly before the cut."""
    from webdataset.tariterators import base_plus_ext  # WebDataset's key convention

    groups: dict[str, dict[str, Any]] = {}
    size = tar.stat().st_size
    whole = True
    try:
        with tarfile.open(tar) as tf:
            for info in tf:
                if info.offset_data + info.size > size:
                    whole = False
                    break
                if not info.isfile():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None:
                    continue
                group = groups.setdefault(key, {"key": key.encode()})
                ext = ext.lower()
                if ext in WDS_IMAGE_EXTS:
                    group["image"] = (str(tar), info.offset_data, info.size)
                elif ext in ("cls", "txt"):
                    group[ext] = tf.extractfile(info).read()
            end = tf.offset
        with open(tar, "rb") as f:  # tarfile stops quietly at a cut header: a whole tar ends in a zero block
            f.seek(end)
            whole = whole and f.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)
    except (tarfile.TarError, EOFError):
        whole = False
    return groups, whole


def _wds_samples(tars: list[Path]) -> tuple[list[tuple[str, int, int]], list[dict[str, bytes]], int, list[str]]:
    """Per sample (in tar order): the image member's location and the small members' bytes; the
    samples without an image; the tars cut short."""
    members: list[tuple[str, int, int]] = []
    extras: list[dict[str, bytes]] = []
    no_image = 0
    cut: list[str] = []
    for tar in tars:
        groups, whole = _read_tar_groups(tar)
        if not whole:
            cut.append(tar.name)
            log.warning("%s is cut short: the %d samples before the cut are scored, those after it are not read",
                        tar, len(groups))
        for group in groups.values():
            if "image" not in group:
                no_image += 1
                continue
            members.append(group.pop("image"))
            extras.append(group)
    return members, extras, no_image, cut


def read_wds(root: str | Path, split: str = "test", templates: str | None = None,
             classnames: str | None = None) -> ClassificationSet | RetrievalSet:
    """clip_benchmark's WebDataset evaluation shards; retrieval when ``dataset_type.txt`` says so."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"clip_benchmark WebDataset layout: expected the folder {root}")
    kind_file = root / "dataset_type.txt"
    kind = read_text(kind_file).strip().lower() if kind_file.is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise DataError(f"{kind_file}: dataset type '{kind}' is not supported (classification or retrieval)")
    names_file = Path(classnames) if classnames and classnames != "imagenet" else root / CLASSNAMES_FILE
    if kind == "classification" and classnames != "imagenet" and not names_file.is_file():
        raise DataError(f"clip_benchmark WebDataset layout: expected {names_file}")
    members, extras, no_image, cut = _wds_samples(_wds_tars(root, split))
    skipped = {"no_image": no_image} if no_image else {}
    if kind == "retrieval":
        paths: list[tuple[str, int, int]] = []
        captions: list[str] = []
        text_to_image: list[int] = []
        for member, extra in zip(members, extras):
            try:
                texts = [t.strip() for t in extra.get("txt", b"").decode("utf-8").splitlines() if t.strip()]
            except UnicodeDecodeError:
                raise DataError(f"{member[0]}: the captions of sample '{extra['key'].decode()}' are not UTF-8 "
                                "text") from None
            if not texts:
                skipped["no_caption"] = skipped.get("no_caption", 0) + 1
                continue
            text_to_image += [len(paths)] * len(texts)
            captions += texts
            paths.append(member)
        if not paths:
            raise DataError(f"{root}/{split}: no sample has an image and a .txt caption")
        return RetrievalSet(TarImages(paths), captions, text_to_image, skipped, cut)
    if classnames == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
    else:
        names = _read_lines(names_file)
    kept, labels = [], []
    for member, extra in zip(members, extras):
        try:
            label = int(extra["cls"].decode().strip())
        except (KeyError, ValueError):  # a .cls that is no number (or not text at all) is no label
            skipped["no_label"] = skipped.get("no_label", 0) + 1
            continue
        if not 0 <= label < len(names):
            raise DataError(f"{member[0]}: class id {label} outside the {len(names)} classes of {names_file}")
        kept.append(member)
        labels.append(label)
    if not kept:
        raise DataError(f"{root}/{split}: no sample has an image and a .cls label")
    if skipped:
        log.warning("%s (%s split): samples skipped: %s", root, split, skipped)
    return ClassificationSet(TarImages(kept), np.array(labels, dtype=np.int64), names,
                             resolve_templates(templates, root), skipped, cut)
