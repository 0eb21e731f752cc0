"""The built-in data set: pictures of coloured shapes with natural captions, made from a seed.

Each picture holds one to three objects (8 shapes, 10 colours, small or large,
anywhere on a 3x3 grid) on a plain, gradient or noisy background. Its caption
comes from a small grammar with synonyms and several word orders and mentions
every object, e.g. "a big red circle to the left of a small blue star" or
"two green triangles on a grey background".

The *main* object is the largest one (the only large one when there are
several); the label columns describe it: ``shape``, ``color``, plus ``count``
(one / two / three objects). These are the zero-shot tasks of ``dataset.json``.
Captions usually mention the main object first, but not always (then a
comparative such as "a larger red circle" marks it), so the tasks need more than
reading the first noun.

Everything is derived from ``(seed, split, index)``, so the same seed gives
byte-identical files whatever the number of worker processes.

Output (the standard format, see `clip_ping.data.pairs`)::

    OUT/images/train/000000.png ...   OUT/train.csv  val.csv  test.csv   OUT/dataset.json
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..config import Config, option
from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the output of a given seed changes

# ----------------------------------------------------------------------------- vocabulary

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart"]

# Words a caption may use for each shape (singular, plural). The first is the class name.
SHAPE_WORDS: dict[str, list[tuple[str, str]]] = {
    "circle": [("circle", "circles"), ("disc", "discs")],
    "square": [("square", "squares"), ("box", "boxes"), ("block", "blocks")],
    "triangle": [("triangle", "triangles")],
    "star": [("star", "stars")],
    "hexagon": [("hexagon", "hexagons")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "heart": [("heart", "hearts")],
}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 30),
    "green": (40, 165, 55),
    "blue": (35, 75, 225),
    "purple": (135, 50, 185),
    "pink": (245, 135, 195),
    "brown": (125, 78, 38),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
COLOR_WORDS: dict[str, list[str]] = {c: [c] for c in COLORS}
COLOR_WORDS["purple"] = ["purple", "violet"]

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (244, 244, 244),
    "light grey": (200, 200, 200),
    "grey": (128, 128, 128),
    "dark grey": (62, 62, 62),
    "black": (14, 14, 14),
    "beige": (226, 212, 178),
}
BG_KINDS = ("plain", "gradient", "noise")

SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["big", "large", "huge"]}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

# 3x3 grid cell (row, col) -> phrases for an object there.
POSITION_PHRASES: dict[tuple[int, int], list[str]] = {
    (0, 0): ["in the top left corner", "at the top left"],
    (0, 1): ["near the top", "at the top"],
    (0, 2): ["in the top right corner", "at the top right"],
    (1, 0): ["on the left", "on the left side"],
    (1, 1): ["in the centre", "in the middle"],
    (1, 2): ["on the right", "on the right side"],
    (2, 0): ["in the bottom left corner", "at the bottom left"],
    (2, 1): ["near the bottom", "at the bottom"],
    (2, 2): ["in the bottom right corner", "at the bottom right"],
}
PREFIXES = ["", "", "", "a photo of ", "a picture of ", "an image of ", "a drawing of ", "a rendering of "]

TASK_TEMPLATES: dict[str, list[str]] = {
    "shape": [
        "a picture of a {} shape.",
        "a drawing of a {}.",
        "a photo of a {}.",
        "a big {}.",
        "a {} on a plain background.",
    ],
    "color": [
        "a picture of something {}.",
        "a {} object.",
        "a picture of a {} shape.",
        "a big {} shape.",
        "something coloured {}.",
    ],
    "count": [
        "a picture of {} objects.",
        "{} shapes.",
        "a drawing of {} things.",
        "an image with {} shapes in it.",
    ],
}

# Min contrast (RGB distance) between an object and its background, so every object is visible.
MIN_CONTRAST = 95.0

# ----------------------------------------------------------------------------- config


@dataclass
class SynthConfig(Config):
    out: str = option("data/synth", "output folder")
    seed: int = option(0, "random seed; the same seed gives byte-identical files")
    n_train: int = option(8000, "pairs in the train split")
    n_val: int = option(1000, "pairs in the val split")
    n_test: int = option(1000, "pairs in the test split")
    image_size: int = option(64, "image side in pixels")
    min_objects: int = option(1, "fewest objects per picture (1-3)")
    max_objects: int = option(3, "most objects per picture (1-3)")
    antialias: bool = option(True, "draw at twice the size and downsample (smoother edges)")
    workers: int = option(0, "processes used to draw (0 = one per CPU core)")
    overwrite: bool = option(False, "replace an existing data set made with other options")

    def validate(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise ConfigError("config keys 'min_objects'/'max_objects' must satisfy 1 <= min_objects <= max_objects <= 3")
        if self.image_size < 16:
            raise ConfigError("config key 'image_size' must be at least 16")
        if self.n_train < 1 or self.n_val < 0 or self.n_test < 0:
            raise ConfigError("config keys 'n_train' (>= 1), 'n_val' and 'n_test' (>= 0) are out of range")
        if self.workers < 0:
            raise ConfigError("config key 'workers' must be >= 0")

    def content_key(self) -> dict[str, Any]:
        """The options that decide the generated bytes (not where or how fast)."""
        d = asdict(self)
        for k in ("out", "workers", "overwrite"):
            d.pop(k)
        d["version"] = GENERATOR_VERSION
        return d


# ----------------------------------------------------------------------------- scene


@dataclass
class Obj:
    shape: str
    color: str
    size: str  # "small" | "large"
    x: float  # centre, fraction of the image side
    y: float
    r: float  # radius, fraction of the image side
    angle: float  # degrees

    @property
    def cell(self) -> tuple[int, int]:
        return (min(2, int(self.y * 3)), min(2, int(self.x * 3)))


@dataclass
class Scene:
    objects: list[Obj]  # objects[0] is the main (largest) object
    bg_kind: str
    bg_name: str
    bg_name2: str  # second colour of a gradient (else same as bg_name)


def _sample_rng(seed: int, split: str, index: int) -> tuple[random.Random, np.random.Generator]:
    # A hash of (seed, split, index) makes each sample independent of the others and of the worker.
    digest = hashlib.sha256(f"clip-ping-synth/{seed}/{split}/{index}".encode()).digest()
    value = int.from_bytes(digest[:8], "little")
    return random.Random(value), np.random.default_rng(value)


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def make_scene(rng: random.Random, min_objects: int, max_objects: int) -> Scene:
    n = rng.randint(min_objects, max_objects)
    main_shape, main_color = rng.choice(SHAPES), rng.choice(list(COLORS))
    shapes, colors = [main_shape], [main_color]
    style = rng.random()
    for _ in range(n - 1):
        if style < 0.15:  # a group of identical objects: "two green triangles"
            shapes.append(main_shape)
            colors.append(main_color)
        elif style < 0.25:  # same shape, other colours: "two stars, a red one and a blue one"
            shapes.append(main_shape)
            colors.append(rng.choice([c for c in COLORS if c != main_color]))
        else:
            shapes.append(rng.choice(SHAPES))
            colors.append(rng.choice(list(COLORS)))

    # Sizes: alone, small or large; in a group, the main object is the only large one.
    if n == 1:
        size = rng.choice(["small", "large"])
        radii = [rng.uniform(0.10, 0.15) if size == "small" else rng.uniform(0.19, 0.26)]
        sizes = [size]
    else:
        radii = [rng.uniform(0.17, 0.22)] + [rng.uniform(0.085, 0.12) for _ in range(n - 1)]
        sizes = ["large"] + ["small"] * (n - 1)

    # Positions: rejection sampling so objects barely touch; shrink a little if it keeps failing.
    centres: list[tuple[float, float]] = []
    for k, r in enumerate(radii):
        for attempt in range(200):
            rr = r * (0.97 ** (attempt // 40))
            x, y = rng.uniform(rr + 0.02, 0.98 - rr), rng.uniform(rr + 0.02, 0.98 - rr)
            if all(math.hypot(x - cx, y - cy) > (rr + radii[j]) * 0.95 for j, (cx, cy) in enumerate(centres)):
                break
        radii[k] = rr
        centres.append((x, y))

    objects = []
    for shape, color, size, r, (x, y) in zip(shapes, colors, sizes, radii, centres):
        # Small rotations only: a square turned by 45 degrees would be a diamond.
        turn = 180.0 if shape in ("star", "hexagon") else 12.0
        objects.append(Obj(shape, color, size, x, y, r, rng.uniform(-turn, turn)))

    # The background must contrast with every object.
    allowed = [b for b, rgb in BACKGROUNDS.items() if all(_contrast(rgb, COLORS[o.color]) >= MIN_CONTRAST for o in objects)]
    if not allowed:  # e.g. black and white objects together: take the best compromise
        allowed = [max(BACKGROUNDS, key=lambda b: min(_contrast(BACKGROUNDS[b], COLORS[o.color]) for o in objects))]
    bg_kind = rng.choices(BG_KINDS, weights=[0.55, 0.25, 0.20])[0]
    bg_name = rng.choice(allowed)
    bg_name2 = rng.choice(allowed) if bg_kind == "gradient" else bg_name
    return Scene(objects, bg_kind, bg_name, bg_name2)


# ----------------------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline of a shape of 'radius' r around (cx, cy), rotated by angle degrees."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(x * 1.0, y * 1.0) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a) * 1.15, math.sin(a) * 1.15 + 0.15) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = 1.1 if k % 2 == 0 else 0.45
            pts.append((math.cos(a) * rad, math.sin(a) * rad))
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    elif shape == "diamond":
        pts = [(0.0, -1.1), (0.68, 0.0), (0.0, 1.1), (-0.68, 0.0)]
    elif shape == "cross":
        t = 0.34
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    elif shape == "heart":
        pts = []
        for k in range(40):
            s = 2 * math.pi * k / 40
            x = 16 * math.sin(s) ** 3
            y = 13 * math.cos(s) - 5 * math.cos(2 * s) - 2 * math.cos(3 * s) - math.cos(4 * s)
            pts.append((x / 16.5, -y / 16.5 + 0.05))
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def render(scene: Scene, size: int, rng: random.Random, nprng: np.random.Generator, antialias: bool = True) -> Image.Image:
    scale = 2 if antialias else 1
    side = size * scale
    c1 = np.array(_jitter(BACKGROUNDS[scene.bg_name], rng, 10), dtype=np.float32)
    if scene.bg_kind == "gradient":
        c2 = np.array(_jitter(BACKGROUNDS[scene.bg_name2], rng, 10), dtype=np.float32)
        if scene.bg_name2 == scene.bg_name:  # still make it a visible gradient
            c2 = np.clip(c2 + rng.choice([-45.0, 45.0]), 0, 255)
        t = np.linspace(0.0, 1.0, side, dtype=np.float32)
        ramp = t[:, None] if rng.random() < 0.5 else t[None, :]
        arr = c1 * (1 - ramp[..., None]) + c2 * ramp[..., None]
        arr = np.broadcast_to(arr, (side, side, 3))
    else:
        arr = np.broadcast_to(c1, (side, side, 3))
    if scene.bg_kind == "noise":
        arr = arr + nprng.normal(0.0, 16.0, size=(side, side, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image)
    # Draw small objects last so the large one never hides them.
    for obj in sorted(scene.objects, key=lambda o: -o.r):
        fill = _jitter(COLORS[obj.color], rng, 18)
        cx, cy, r = obj.x * side, obj.y * side, obj.r * side
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, obj.angle), fill=fill)
    if scale > 1:
        image = image.reduce(scale)
    return image


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _shape_word(rng: random.Random, shape: str, plural: bool = False) -> str:
    singular, many = rng.choice(SHAPE_WORDS[shape])
    return many if plural else singular


def _np(rng: random.Random, obj: Obj, with_size: bool | None = None) -> str:
    """Noun phrase without article, e.g. 'small red star'."""
    if with_size is None:
        with_size = rng.random() < 0.6
    words = []
    if with_size:
        words.append(rng.choice(SIZE_WORDS[obj.size]))
    words.append(rng.choice(COLOR_WORDS[obj.color]))
    words.append(_shape_word(rng, obj.shape))
    return " ".join(words)


def _position(rng: random.Random, obj: Obj) -> str:
    return rng.choice(POSITION_PHRASES[obj.cell])


def _background(rng: random.Random, scene: Scene) -> str:
    if scene.bg_kind == "gradient":
        return rng.choice(["a gradient background", "a shaded background", "a fading background"])
    name = scene.bg_name
    if scene.bg_kind == "noise":
        return rng.choice([f"a noisy {name} background", f"a textured {name} background", f"a grainy {name} background"])
    return rng.choice([f"a {name} background", f"a plain {name} background"])


def _relation(main: Obj, other: Obj) -> str:
    """Where the main object is relative to the other one."""
    dx, dy = other.x - main.x, other.y - main.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_caption(scene: Scene, rng: random.Random) -> str:
    objs = scene.objects
    main, others = objs[0], objs[1:]
    n = len(objs)
    prefix = rng.choice(PREFIXES)
    bg = f" on {_background(rng, scene)}" if rng.random() < 0.3 else ""

    if n == 1:
        form = rng.randrange(6)
        if form == 0:
            text = f"{prefix}{_with_article(_np(rng, main))} {_position(rng, main)}"
        elif form == 1:
            text = f"{_position(rng, main)}, {_with_article(_np(rng, main, True))}"
        elif form == 2:
            thing = _with_article(rng.choice(SIZE_WORDS[main.size]) + " " + _shape_word(rng, main.shape))
            text = f"there is {thing} in {rng.choice(COLOR_WORDS[main.color])} {_position(rng, main)}"
        elif form == 3:
            text = f"{prefix}{_with_article(_np(rng, main))}{bg or ' on ' + _background(rng, scene)}"
            bg = ""
        elif form == 4:
            text = f"{prefix}just one {_np(rng, main)}"
        else:
            text = f"{prefix}{_with_article(_np(rng, main, True))}"
        text += bg
    elif all(o.shape == main.shape and o.color == main.color for o in others):
        count = COUNT_WORDS[n]
        shapes = _shape_word(rng, main.shape, plural=True)
        color = rng.choice(COLOR_WORDS[main.color])
        tail = rng.choice(["one big and one small", "one large and one little"]) if n == 2 else rng.choice(
            ["one big and two small", "one large and two tiny"]
        )
        text = f"{prefix}{count} {color} {shapes}" + (f", {tail}" if rng.random() < 0.5 else "") + bg
    elif all(o.shape == main.shape for o in others):
        count = COUNT_WORDS[n]
        shapes = _shape_word(rng, main.shape, plural=True)
        ones = [f"a {rng.choice(SIZE_WORDS['large'])} {rng.choice(COLOR_WORDS[main.color])} one"] + [
            f"a {rng.choice(SIZE_WORDS['small'])} {rng.choice(COLOR_WORDS[o.color])} one" for o in others
        ]
        text = f"{prefix}{count} {shapes}: {_join(ones)}{bg}"
    else:
        form = rng.randrange(5)
        rest = [_with_article(_np(rng, o)) for o in others]
        if form == 0:  # relation between the main object and the next one
            text = f"{prefix}{_with_article(_np(rng, main, True))} {_relation(main, others[0])} {rest[0]}"
            if len(rest) > 1:
                text += f" and {rest[1]}"
            text += bg
        elif form == 1:  # plain list
            text = f"{prefix}{_join([_with_article(_np(rng, main)), *rest])}{bg}"
        elif form == 2:
            text = f"{prefix}{_with_article(_np(rng, main, True))} with {_join(rest)}{bg}"
        elif form == 3:  # counted list
            noun = rng.choice(["shapes", "objects", "things"])
            text = f"{prefix}{COUNT_WORDS[n]} {noun}: {_join([_with_article(_np(rng, main)), *rest])}"
        else:  # main object mentioned last, marked by a comparative
            bigger = rng.choice(["larger", "bigger"])
            near = rng.choice(["next to", "beside", "near"] + (["and"] if len(rest) == 1 else []))
            thing = _with_article(bigger + " " + rng.choice(COLOR_WORDS[main.color]) + " " + _shape_word(rng, main.shape))
            text = f"{_join(rest)} {near} {thing}{bg}"
    if rng.random() < 0.3:
        text += "."
    return text


# ----------------------------------------------------------------------------- generation


def make_sample(seed: int, split: str, index: int, cfg: SynthConfig) -> tuple[Image.Image, str, dict[str, str]]:
    """Picture, caption and labels of one sample (pure function of its arguments)."""
    rng, nprng = _sample_rng(seed, split, index)
    scene = make_scene(rng, cfg.min_objects, cfg.max_objects)
    image = render(scene, cfg.image_size, rng, nprng, cfg.antialias)
    caption = make_caption(scene, rng)
    main = scene.objects[0]
    labels = {"shape": main.shape, "color": main.color, "count": COUNT_WORDS[len(scene.objects)]}
    return image, caption, labels


def _write_chunk(args: tuple[SynthConfig, str, int, int, str]) -> list[tuple[str, str, dict[str, str]]]:
    cfg, split, start, stop, image_dir = args
    rows = []
    for i in range(start, stop):
        image, caption, labels = make_sample(cfg.seed, split, i, cfg)
        name = f"{i:06d}.png"
        # Fixed encoder options and no metadata: the same image gives the same bytes.
        image.save(os.path.join(image_dir, name), format="PNG", optimize=False, compress_level=6)
        rows.append((f"images/{split}/{name}", caption, labels))
    return rows


def _dataset_json(cfg: SynthConfig) -> dict[str, Any]:
    counts = [COUNT_WORDS[n] for n in range(cfg.min_objects, cfg.max_objects + 1)]
    return {
        "name": "synth-shapes",
        "description": "procedural pictures of coloured shapes with captions (clip_ping.data.synth)",
        "tasks": {
            "shape": {"column": "shape", "classes": list(SHAPES), "templates": TASK_TEMPLATES["shape"]},
            "color": {"column": "color", "classes": list(COLORS), "templates": TASK_TEMPLATES["color"]},
            "count": {"column": "count", "classes": counts, "templates": TASK_TEMPLATES["count"]},
        },
        "generator": cfg.content_key(),
    }


def generate_synthetic(cfg: SynthConfig, progress: bool = True) -> Path:
    """Write the synthetic data set to ``cfg.out`` and return that folder.

    If the folder already holds a data set made with the same options, it is kept
    as it is (generation is skipped). One made with other options is refused
    unless ``cfg.overwrite``.
    """
    out = Path(cfg.out)
    meta_path = out / "dataset.json"
    info = _dataset_json(cfg)
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text()).get("generator")
        except (json.JSONDecodeError, AttributeError):
            old = None
        complete = all((out / f"{s}.csv").is_file() for s in ("train", "val", "test"))
        if old == info["generator"] and complete:
            log.info("synthetic data set already in %s (same options): kept", out)
            return out
        if not cfg.overwrite:
            raise DataError(f"{out} already holds a data set made with other options; pass --overwrite or another --out")
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise DataError(f"{out} exists and is not empty; pass --overwrite or another --out")

    splits = [("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)]
    total = sum(n for _, n in splits)
    # Auto: one process per core, but processes cost more than they save on tiny sets.
    workers = cfg.workers or max(1, min(os.cpu_count() or 1, total // 500 + 1))
    chunk = max(1, min(250, total // (4 * workers) or 1))
    jobs = []
    for split, n in splits:
        image_dir = out / "images" / split
        if image_dir.is_dir():  # stale pictures of an earlier, larger set must not linger
            for old_file in image_dir.glob("*.png"):
                old_file.unlink()
        image_dir.mkdir(parents=True, exist_ok=True)
        jobs += [(cfg, split, s, min(s + chunk, n), str(image_dir)) for s in range(0, n, chunk)]
    meta_path.unlink(missing_ok=True)  # written last: its presence marks a complete data set

    started = time.perf_counter()
    rows: dict[str, list] = {s: [] for s, _ in splits}
    bar = tqdm(total=total, desc="synth", unit="img", disable=not progress)
    pool = None
    try:
        results: Iterable[list[tuple[str, str, dict[str, str]]]]
        if workers == 1:
            results = map(_write_chunk, jobs)
        else:
            # The platform's default start method; _write_chunk and SynthConfig pickle fine.
            pool = mp.get_context().Pool(workers)
            results = pool.imap(_write_chunk, jobs)  # imap keeps job order: rows stay in index order
        for job, chunk_rows in zip(jobs, results):
            rows[job[1]].extend(chunk_rows)
            bar.update(len(chunk_rows))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()

    for split, _ in splits:
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["filepath", "caption", "shape", "color", "count"])
            for path, caption, labels in rows[split]:
                writer.writerow([path, caption, labels["shape"], labels["color"], labels["count"]])
    meta_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    elapsed = time.perf_counter() - started
    log.info("wrote %d pairs to %s in %.1f s (%d workers)", total, out, elapsed, workers)
    if progress:
        print(f"synth: {total} pairs written to {out} in {elapsed:.1f} s with {workers} worker(s)")
    return out
