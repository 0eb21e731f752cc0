"""Captions of the built-in data set (`clip_ping.data.synth`): a small grammar with synonyms and
several word orders that mentions every object of a scene.
"""

from __future__ import annotations

import random

from .synth_scenes import COLOR_WORDS, COUNT_WORDS, POSITION_PHRASES, PREFIXES, SHAPE_WORDS, SIZE_WORDS, Obj, Scene

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
