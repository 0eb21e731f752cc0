"""Scenes of the built-in data set (`clip_ping.data.synth`): the vocabulary, a random scene of one
to three objects, and its drawing. Everything is drawn from the random generators it is given.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

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


def sample_rngs(seed: int, split: str, index: int) -> tuple[random.Random, np.random.Generator]:
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
