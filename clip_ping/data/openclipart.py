"""The OpenClipart library (Debian's ``openclipart-png`` + ``openclipart-svg``) as a captioned data set.

Install: ``sudo apt-get install openclipart-png openclipart-svg``. They hold the
same tree twice: ``ROOT/png/<category>/<sub>/.../<name>.png`` and
``ROOT/svg/<same path>.svg``. Each SVG carries RDF metadata: ``dc:title``,
``dc:description`` and ``dc:subject`` keywords of the ``cc:Work``; the folder
path is a category taxonomy.

One pair per picture:

* caption: built from title, description and keywords (``caption_fields``), with
  noise removed: empty and duplicate keywords, words such as "unsorted" or
  "clip art", hashes, numbers, URLs and file-name debris. Boilerplate is found
  from the data: a title or a description sentence that more than
  ``boilerplate_min_files`` pictures share (compared with digits masked, so
  date-stamped collection lines count as one) says which series a picture
  belongs to, not what it shows; it is dropped. A picture without a usable
  title gets one from its file name.
* labels: ``category`` (top-level folder, e.g. "animals") and ``subcategory``
  (second level, e.g. "birds"; empty for pictures directly in a top folder),
  as readable class names. A class with fewer than ``min_class_size`` pictures is
  left out of its task (its rows get an empty label, which evaluation ignores).
* split: by group. Pictures with the same cleaned caption, the same image bytes
  or the same image after shrinking to a 16 x 16 thumbnail are linked; each
  linked group goes whole to one split, from a hash of its first path (and
  ``seed``), so no test caption or image occurs in train. Groups larger than
  ``max_eval_group`` pictures (series) go to train.
* statistics: rows, distinct captions, shared captions, the largest group and
  the leakage between splits (0 by construction) go into ``dataset.json``.
* image: composited on ``background`` (the PNGs are transparent), padded to a
  square and resized to ``image_size`` pixels, written to ``OUT/images/``
  (``image_size=0`` keeps the original files and only writes the tables).

Output: ``OUT/train.csv val.csv test.csv dataset.json openclipart_summary.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageColor
from tqdm import tqdm

from ..config import Config, option
from ..errors import ConfigError, DataError
from ..io import claim_folder
from .folders import readable_name
from .images import ImageDecodeError, load_image

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with: sudo apt-get install openclipart-png openclipart-svg (Debian/Ubuntu), or pass --root"

# Keywords and titles that say nothing about the picture.
NOISE_WORDS = {
    "", "unsorted", "clip art", "clipart", "clip-art", "clip_art", "image", "images", "media", "png", "svg",
    "public domain", "publicdomain", "pd", "openclipart", "open clip art", "ocal", "externalsource",
    "external source", "untitled", "no title", "none", "null", "remix", "inkscape", "drawing", "picture",
    "illustration", "graphic", "graphics", "vector", "art", "new", "other", "misc", "stuff", "etc",
}
_HASH = re.compile(r"^(?=.*\d)[0-9a-f]{6,}$", re.I)
_URL = re.compile(r"(https?://|www\.)\S+", re.I)
_SPACES = re.compile(r"\s+")

TEMPLATES = {
    "category": ["a picture of {}.", "clip art of {}.", "an illustration of {}.", "a drawing related to {}."],
    "subcategory": ["a picture of {}.", "clip art of {}.", "an illustration of {}.", "a drawing of {}."],
}


@dataclass
class OpenClipartConfig(Config):
    root: str = option("/usr/share/openclipart", "OpenClipart folder holding png/ and svg/")
    out: str = option("data/openclipart", "output data set folder")
    caption_fields: list[str] = option(["title", "description", "keywords"], "caption parts, in order")
    max_keywords: int = option(6, "keywords kept per caption", bounds=">= 0")
    max_caption_chars: int = option(250, "captions are cut at a word boundary after this many characters", bounds=">= 1")
    val_fraction: float = option(0.1, "share of pictures in the val split", bounds="[0, 1)")
    test_fraction: float = option(0.1, "share of pictures in the test split", bounds="[0, 1)")
    seed: int = option(0, "salt of the split hash", bounds="[0, 4294967295]")
    image_size: int = option(128, "side of the written square images (0 = keep the original files)", bounds="[0, 4096]")
    background: str = option("white", "colour transparent pixels are composited on")
    min_class_size: int = option(10, "smallest class kept in a zero-shot task", bounds=">= 1")
    boilerplate_min_files: int = option(10, "a title or description sentence shared by at least this many pictures is "
                                             "boilerplate and dropped (0: keep everything)", bounds=">= 0")
    max_eval_group: int = option(25, "linked groups (same caption or image) larger than this go to train only", bounds=">= 1")
    exclude: list[str] = option(["unsorted/duplicates", "special/gradients"], "folders (relative to png/) left out")
    workers: int = option(0, "processes for decoding and resizing (0 = one per CPU core)", bounds=">= 0")
    overwrite: bool = option(False, "write into a non-empty output folder")

    def validate(self) -> None:
        bad = [f for f in self.caption_fields if f not in ("title", "description", "keywords")]
        if bad or not self.caption_fields:
            raise ConfigError(f"config key 'caption_fields': use title, description and/or keywords (got {bad or 'none'})")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("config keys 'val_fraction' and 'test_fraction' must sum to less than 1")
        try:
            ImageColor.getrgb(self.background)
        except ValueError:
            raise ConfigError(f"config key 'background': unknown colour {self.background!r}") from None


# --------------------------------------------------------------------------- metadata


def _text(element: ET.Element | None) -> str:
    return _SPACES.sub(" ", "".join(element.itertext())).strip() if element is not None else ""


def read_svg_metadata(path: str | Path) -> dict[str, Any]:
    """``{"title", "description", "keywords"}`` of an SVG's cc:Work (empty when absent or unreadable).

    Parsing stops at the end of the ``<metadata>`` element, so large drawings are not read whole.
    """
    result: dict[str, Any] = {"title": "", "description": "", "keywords": [], "svg_title": ""}
    try:
        for _, element in ET.iterparse(str(path), events=("end",)):
            tag = element.tag.rsplit("}", 1)[-1]
            if tag == "Work":
                for child in element:
                    name = child.tag.rsplit("}", 1)[-1]
                    if name == "title":
                        result["title"] = _text(child)
                    elif name == "description":
                        result["description"] = _text(child)
                    elif name == "subject":
                        items = [_text(li) for li in child.iter() if li.tag.rsplit("}", 1)[-1] == "li"]
                        if not items:  # keywords as plain text: "a, b, c" or "a b c"
                            raw = _text(child)
                            items = raw.split(",") if "," in raw else raw.split()
                        result["keywords"] = items
            elif tag == "title" and not result["svg_title"] and element.tag.startswith("{http://www.w3.org/2000/svg}"):
                result["svg_title"] = _text(element)
            elif tag == "metadata":
                break
    except (ET.ParseError, OSError, UnicodeDecodeError):
        result["unreadable"] = True
    return result


def clean_phrase(text: str) -> str:
    """Collapse spaces, drop URLs, underscores and hashes; '' when nothing meaningful is left."""
    text = _URL.sub(" ", text).replace("_", " ")
    words = [w for w in _SPACES.sub(" ", text).strip().split(" ") if not _HASH.match(w.strip(".,;:()"))]
    text = " ".join(words).strip(" .,;:-")
    return "" if text.lower() in NOISE_WORDS or text.isdigit() else text


def title_from_filename(stem: str) -> str:
    """'chemistry_flask_matthew__02' -> 'chemistry flask matthew' (trailing numbers dropped)."""
    words = [w for w in re.split(r"[_\-\s]+", stem) if w and not w.isdigit()]
    return clean_phrase(" ".join(words))


def clean_keywords(keywords: list[str], title: str, limit: int) -> list[str]:
    seen = {w.lower() for w in re.findall(r"\w+", title)}  # words the title already says
    kept: list[str] = []
    for raw in keywords:
        word = clean_phrase(raw).lower()
        if word and word not in seen and len(word) <= 40:
            kept.append(word)
            seen.add(word)
        if len(kept) >= limit:
            break
    return kept


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:.")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_DIGITS = re.compile(r"\d+")


def boilerplate_key(text: str) -> str:
    """What two copies of a boilerplate line have in common: lower case, digit runs masked."""
    return _DIGITS.sub("#", _SPACES.sub(" ", text).strip(" .,;:-").lower())


def description_sentences(description: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(_SPACES.sub(" ", description).strip()) if s.strip()]


def find_boilerplate(metas: list[dict[str, Any]], min_files: int) -> set[str]:
    """Keys (`boilerplate_key`) of titles and description sentences that at least ``min_files`` pictures share."""
    if min_files <= 0:
        return set()
    counts: Counter[str] = Counter()
    for meta in metas:
        keys = {boilerplate_key(meta.get("title", "")), boilerplate_key(meta.get("svg_title", ""))}
        keys.update(boilerplate_key(s) for s in description_sentences(meta.get("description", "")))
        counts.update(k for k in keys if k)
    return {k for k, n in counts.items() if n >= min_files}


def make_caption(meta: dict[str, Any], stem: str, cfg: OpenClipartConfig,
                 boilerplate: set[str] | frozenset[str] = frozenset()) -> tuple[str, str]:
    """(caption, where the title came from: 'svg' | 'filename'); ``boilerplate`` lines are left out."""
    def specific(text: str) -> str:
        return "" if boilerplate_key(text) in boilerplate else clean_phrase(text)

    title = specific(meta.get("title", "")) or specific(meta.get("svg_title", ""))
    source = "svg"
    if not title:
        title, source = title_from_filename(stem), "filename"
    kept = [s for s in description_sentences(meta.get("description", "")) if boilerplate_key(s) not in boilerplate]
    description = clean_phrase(" ".join(kept))
    if description.lower() == title.lower():
        description = ""
    keywords = clean_keywords(meta.get("keywords", []), title, cfg.max_keywords)
    parts = []
    for name in cfg.caption_fields:
        if name == "title" and title:
            parts.append(title)
        elif name == "description" and description:
            parts.append(_shorten(description, cfg.max_caption_chars // 2))
        elif name == "keywords" and keywords:
            parts.append(", ".join(keywords))
    return _shorten(". ".join(parts), cfg.max_caption_chars), source


def assign_splits_by_group(rows: list[dict[str, Any]], cfg: OpenClipartConfig) -> None:
    """Set ``row["split"]`` so that rows linked by caption, image bytes or thumbnail share a split."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        for key in (("caption", row["caption"]), ("bytes", row["image_sha"]), ("thumbnail", row["thumbnail"])):
            j = first_of.setdefault(key, i)
            parent[find(i)] = find(j)
    members: dict[int, list[int]] = {}
    for i in range(len(rows)):
        members.setdefault(find(i), []).append(i)
    for group in members.values():
        name = min(rows[i]["rel"] for i in group)  # stable as the library grows
        split = "train" if len(group) > cfg.max_eval_group else split_of(name, cfg)
        for i in group:
            rows[i]["split"] = split
            rows[i]["group_size"] = len(group)


def split_statistics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows, distinct captions, shared captions and the largest caption group per split, and leakage."""
    stats: dict[str, Any] = {}
    captions = {s: Counter(r["caption"] for r in rows if r["split"] == s) for s in ("train", "val", "test")}
    images = {s: {r["image_sha"] for r in rows if r["split"] == s} | {r["thumbnail"] for r in rows if r["split"] == s}
              for s in ("train", "val", "test")}
    for split, counts in captions.items():
        stats[split] = {"rows": sum(counts.values()), "distinct_captions": len(counts),
                        "rows_with_shared_caption": sum(n for n in counts.values() if n > 1),
                        "largest_caption_group": max(counts.values(), default=0)}
    for split in ("val", "test"):
        stats[split]["rows_whose_caption_is_in_train"] = sum(n for c, n in captions[split].items() if c in captions["train"])
        stats[split]["images_also_in_train"] = len(images[split] & images["train"])
    return stats


def split_of(rel: str, cfg: OpenClipartConfig) -> str:
    digest = hashlib.sha256(f"{cfg.seed}/{rel}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


# --------------------------------------------------------------------------- conversion


def _square_on_background(image: Image.Image, side: int, background: tuple[int, int, int]) -> Image.Image:
    # Pad to a square first, so a centre crop later never cuts the drawing.
    w, h = image.size
    big = max(w, h)
    canvas = Image.new("RGB", (big, big), background)
    canvas.paste(image, ((big - w) // 2, (big - h) // 2))
    return canvas.resize((side, side), Image.Resampling.BICUBIC) if big != side else canvas


def thumbnail_key(image: Image.Image) -> str:
    """The same for an image and its resized copies: a 16 x 16 thumbnail, 5 bits per channel."""
    thumb = image.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
    return hashlib.sha256(bytes(v >> 3 for v in thumb.tobytes())).hexdigest()


def _process(job: tuple[str, str, str, OpenClipartConfig]) -> dict[str, Any]:
    """One picture: metadata, image keys, and (optionally) the resized copy. Runs in a worker."""
    png, svg, rel, cfg = job
    meta = read_svg_metadata(svg) if os.path.isfile(svg) else {"missing": True}
    row: dict[str, Any] = {"rel": rel, "meta": meta,
                           "svg": "missing" if meta.get("missing") else ("unreadable" if meta.get("unreadable") else "ok")}
    background = ImageColor.getrgb(cfg.background)[:3]
    try:
        with warnings.catch_warnings():
            # A few posters are 170 megapixels: large but legitimate, not a decompression bomb.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_image(png, background=background)  # composites transparency on the background
    except ImageDecodeError:
        row["error"] = "undecodable_image"
        return row
    row["image_sha"] = hashlib.sha256(Path(png).read_bytes()).hexdigest()
    row["thumbnail"] = thumbnail_key(_square_on_background(image, max(image.size), background))
    if cfg.image_size:
        target = Path(cfg.out) / "images" / Path(rel).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        _square_on_background(image, cfg.image_size, background).save(target, format="PNG")
        row["filepath"] = target.relative_to(cfg.out).as_posix()
    else:
        row["filepath"] = os.path.abspath(png)
    return row


def convert_openclipart(cfg: OpenClipartConfig) -> dict[str, Any]:
    """Convert the OpenClipart tree under ``cfg.root`` into ``cfg.out``; returns the summary."""
    root = Path(cfg.root)
    png_root, svg_root = root / "png", root / "svg"
    if not png_root.is_dir():
        raise DataError(f"OpenClipart PNGs not found under {png_root}; {INSTALL_HINT}")
    if not svg_root.is_dir():
        raise DataError(f"OpenClipart SVGs (titles, keywords) not found under {svg_root}; {INSTALL_HINT}")
    out = Path(cfg.out)
    claim = claim_folder(out, "OpenClipart data set", overwrite=cfg.overwrite)
    if claim.recorded and not cfg.overwrite:
        raise DataError(f"{out} already holds an OpenClipart data set; pass --overwrite to replace it, or another --out")
    claim.require_only_own()
    before = claim.snapshot()
    try:
        return _convert_into(cfg, root, png_root, svg_root, out)
    finally:
        claim.record_new(before)  # what was written, also by a run that failed half-way


def _convert_into(cfg: OpenClipartConfig, root: Path, png_root: Path, svg_root: Path, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    excluded = tuple(e.strip("/") + "/" for e in cfg.exclude)
    jobs, n_excluded = [], 0
    for png in sorted(png_root.rglob("*.png")):
        rel = png.relative_to(png_root).as_posix()
        if rel.startswith(excluded):
            n_excluded += 1
            continue
        svg = svg_root / Path(rel).with_suffix(".svg")
        jobs.append((str(png), str(svg), rel, cfg))
    if not jobs:
        raise DataError(f"no PNG pictures under {png_root}; {INSTALL_HINT}")

    workers = cfg.workers or max(1, min(os.cpu_count() or 1, len(jobs) // 50 + 1))
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(jobs), desc="openclipart", unit="img") as bar:
        if workers == 1:
            for job in jobs:
                rows.append(_process(job))
                bar.update()
        else:
            with mp.get_context().Pool(workers) as pool:
                for row in pool.imap(_process, jobs, chunksize=16):  # imap keeps the sorted order
                    rows.append(row)
                    bar.update()

    skipped: Counter[str] = Counter()
    if n_excluded:
        skipped["excluded_folder"] = n_excluded
    boilerplate = find_boilerplate([r["meta"] for r in rows], cfg.boilerplate_min_files)
    kept = []
    for row in rows:
        if "error" in row:
            skipped[row["error"]] += 1
            continue
        row["caption"], row["title_source"] = make_caption(row["meta"], Path(row["rel"]).stem, cfg, boilerplate)
        if not row["caption"]:
            skipped["empty_caption"] += 1
            continue
        parts = row["rel"].split("/")[:-1]
        row["category"] = readable_name(parts[0]) if parts else ""
        row["subcategory"] = readable_name(parts[1]) if len(parts) > 1 else ""
        kept.append(row)
    assign_splits_by_group(kept, cfg)

    # Classes: enough pictures in the whole set (so each split's labels share one class list).
    tasks: dict[str, Any] = {}
    classes_per_level: dict[str, dict[str, int]] = {}
    for level in ("category", "subcategory"):
        counts = Counter(r[level] for r in kept if r[level])
        classes = sorted(c for c, n in counts.items() if n >= cfg.min_class_size)
        for r in kept:
            if r[level] not in classes:
                r[level] = ""
        classes_per_level[level] = {c: counts[c] for c in classes}
        if len(classes) >= 2:
            tasks[level] = {"column": level, "classes": classes, "templates": TEMPLATES[level]}

    per_split: dict[str, int] = {}
    for split in ("train", "val", "test"):
        split_rows = [r for r in kept if r["split"] == split]
        per_split[split] = len(split_rows)
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["filepath", "caption", "category", "subcategory"])
            for r in split_rows:
                writer.writerow([r["filepath"], r["caption"], r["category"], r["subcategory"]])
    statistics = split_statistics(kept)
    info = {"name": "openclipart", "description": f"OpenClipart pictures from {root}", "tasks": tasks,
            "statistics": statistics, "boilerplate_lines_dropped": len(boilerplate)}
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    summary = {
        "root": str(root),
        "out": str(out),
        "pictures_found": len(rows) + n_excluded,
        "pairs_kept": len(kept),
        "per_split": per_split,
        "skipped": dict(skipped),
        "svg_metadata": dict(Counter(r["svg"] for r in rows)),
        "title_from": dict(Counter(r["title_source"] for r in kept)),
        "classes": {level: len(c) for level, c in classes_per_level.items()},
        "statistics": statistics,
        "class_sizes": classes_per_level,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "openclipart_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("openclipart: %d pairs (%s), skipped %s", len(kept), per_split, dict(skipped))
    return summary
