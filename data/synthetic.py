"""Synthetic shapes captioning dataset: a deterministic, learnable, download-free stand-in for MS-COCO.

Two domains: the quickstart's (8 colours, 6 shapes, 4 backgrounds), and a shifted one that adds colours, shapes and
backgrounds the quickstart never shows (and words its vocabulary lacks), to measure fine-tuning a trained captioner.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data.vocab import tokenize
from utils.cli import parse_dataclass
from utils.fields import option
from utils.files import atomic_write_json

GENERATOR_VERSION = 1
DATASET_NAME = "synthetic"
JSON_NAME = "dataset_synthetic.json"
GROUND_TRUTH_NAME = "ground_truth.json"
IMAGES_DIR = "images"
MARKER_NAME = "synthetic_complete.json"  # written last: its presence means the output is complete
PARTIAL_MARKER_NAME = ".synthetic_partial.json"  # written first: an interrupted run of ours, safe to redo

# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary of the scene grammar. Canonical names first; every word a caption may use maps back to one of them.

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (45, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 205),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),  # only on dark backgrounds
    "black": (20, 20, 20),  # only on light backgrounds
}
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "white": ("white",),
    "black": ("black",),
    "pink": ("pink",),  # the shifted domain's colours from here on
    "brown": ("brown",),
    "cyan": ("cyan", "turquoise"),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
# canonical shape -> ((singular, plural), ...): the first pair is the canonical word
SHAPE_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"),),
    "heart": (("heart", "hearts"),),  # the shifted domain's shapes from here on
    "ring": (("ring", "rings"),),
    "arrow": (("arrow", "arrows"),),
}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
COUNT_WORDS: dict[int, tuple[str, ...]] = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "stripes", "gradient")
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "flat"),
    "noise": ("noisy", "grainy"),
    "stripes": ("striped",),
    "gradient": ("gradient", "shaded"),
    "checkered": ("checkered", "checked"),  # the shifted domain's backgrounds from here on
    "dotted": ("dotted", "spotted"),
}
BRIGHTNESS_WORDS: dict[str, tuple[str, ...]] = {"dark": ("dark",), "light": ("light", "pale")}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below", "next to")

# The shifted domain's additions: colours, shapes and backgrounds (and their words) the quickstart never shows.
SHIFTED_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (245, 120, 190), "brown": (140, 85, 40),
                                                    "cyan": (40, 205, 215)}
SHIFTED_SHAPES: tuple[str, ...] = ("heart", "ring", "arrow")
SHIFTED_BACKGROUNDS: tuple[str, ...] = ("checkered", "dotted")
ALL_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, **SHIFTED_COLOURS}


@dataclass(frozen=True)
class Domain:
    """What a dataset's scenes draw from: colour, shape and background names (keys of the tables above)."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    backgrounds: tuple[str, ...]


DOMAINS: dict[str, Domain] = {
    "quickstart": Domain(tuple(COLOURS), SHAPES, BACKGROUNDS),
    "shifted": Domain(tuple(ALL_COLOURS), SHAPES + SHIFTED_SHAPES, BACKGROUNDS + SHIFTED_BACKGROUNDS),
}

_SIZE_RADIUS = {"small": (0.10, 0.12), "large": (0.17, 0.20)}  # bounding radius as a share of the image side
_VOWELS = frozenset("aeiou")


def shape_vocabulary() -> dict[str, Any]:
    """The grammar's word lists (both domains), canonical names first, so a report can name what the captions talk
    about.

    Keys: "colours", "shapes", "sizes", "backgrounds" (canonical names), "counts" ({number word: count}),
    "relations" (phrases), "colour_words", "shape_words", "size_words", "background_words" ({word: canonical}),
    "shape_plurals" (the plural nouns).
    """
    return {
        "colours": list(ALL_COLOURS),
        "shapes": list(SHAPE_NOUNS),
        "sizes": list(SIZES),
        "backgrounds": list(BACKGROUND_WORDS),
        "counts": {word: count for count, words in COUNT_WORDS.items() for word in words} | {"an": 1},
        "relations": list(RELATIONS),
        "colour_words": {w: c for c, ws in COLOUR_SYNONYMS.items() for w in ws},
        "shape_words": {w: s for s, pairs in SHAPE_NOUNS.items() for pair in pairs for w in pair},
        "shape_plurals": sorted(p for pairs in SHAPE_NOUNS.values() for _, p in pairs),
        "size_words": {w: s for s, ws in SIZE_SYNONYMS.items() for w in ws},
        "background_words": {w: b for b, ws in BACKGROUND_WORDS.items() for w in ws},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SyntheticConfig:
    """How many images per split, their side in pixels, the seed, the number of captions per image and the domain."""

    num_train: int = option(4000, "training images", group="data")
    num_val: int = option(500, "validation images", group="data")
    num_test: int = option(500, "test images", group="data")
    image_size: int = option(64, "image side in pixels (32 to 1024)", group="data")
    seed: int = option(0, "image i depends only on (seed, i)", group="data")
    captions_per_image: int = option(5, "distinct captions per image (1 to 10)", group="data")
    domain: str = option("quickstart", "the scenes' colours, shapes and backgrounds: quickstart, or shifted (adds "
                         f"{', '.join([*SHIFTED_COLOURS, *SHIFTED_SHAPES, *SHIFTED_BACKGROUNDS])})",
                         choices=tuple(DOMAINS), group="data")

    def __post_init__(self) -> None:
        """Reject sizes the generator cannot honour, with a message naming the field."""
        for name in ("num_train", "num_val", "num_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SyntheticConfig.{name} must be a non-negative int, got {value!r}")
        if self.num_train + self.num_val + self.num_test < 1:
            raise ValueError("SyntheticConfig needs at least one image in total")
        if not isinstance(self.image_size, int) or not 32 <= self.image_size <= 1024:
            raise ValueError(f"SyntheticConfig.image_size must be an int in [32, 1024], got {self.image_size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SyntheticConfig.seed must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.captions_per_image, int) or not 1 <= self.captions_per_image <= 10:
            raise ValueError(f"SyntheticConfig.captions_per_image must be in [1, 10], got {self.captions_per_image!r}")
        if self.domain not in DOMAINS:
            raise ValueError(f"SyntheticConfig.domain must be one of {', '.join(DOMAINS)}, got {self.domain!r}")

    @property
    def num_images(self) -> int:
        """Total number of images over the three splits."""
        return self.num_train + self.num_val + self.num_test

    def split_of(self, imgid: int) -> str:
        """The split of an image id: train ids first, then val, then test."""
        if imgid < self.num_train:
            return "train"
        return "val" if imgid < self.num_train + self.num_val else "test"


# ----------------------------------------------------------------------------------------------------------------------
# Scene sampling


@dataclass(frozen=True)
class _Object:
    """One drawn shape: what it is, where (pixels), its exact colour and the index of its group."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    angle: float
    rgb: tuple[int, int, int]
    group: int


@dataclass(frozen=True)
class _Group:
    """Objects sharing colour, shape and size; a caption names each group once ('two red circles')."""

    colour: str
    shape: str
    count: int
    size: str


@dataclass(frozen=True)
class _Scene:
    """Everything needed to render an image and caption it."""

    background: str
    brightness: str
    bg_rgb: tuple[int, int, int]
    texture: dict[str, float]
    groups: tuple[_Group, ...]
    objects: tuple[_Object, ...]
    axis: str | None  # "x": groups ordered left to right, "y": top to bottom, None: a single group
    order: tuple[int, ...]  # group indices in spatial order along axis
    location: str | None  # for a lone object clearly inside one zone: "top left", "left", "centre", ...


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    """HSV in [0, 1] to 8-bit RGB."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _group_structure(rng: np.random.Generator) -> list[int]:
    """Counts of the groups: one to three objects, sometimes repeated ('two red circles')."""
    n_objects = int(rng.choice([1, 2, 3], p=[0.35, 0.35, 0.30]))
    if n_objects == 1:
        return [1]
    if n_objects == 2:
        return [2] if rng.random() < 0.35 else [1, 1]
    u = rng.random()
    if u < 0.2:
        return [3]
    return [2, 1] if u < 0.55 else [1, 1, 1]


def _location_of(x: float, y: float, size: int) -> str | None:
    """Coarse location of a lone object, or None when its centre is near a zone border (ambiguous)."""
    margin = 0.04 * size

    def zone(v: float, names: tuple[str, str, str]) -> str | None:
        """The third of the side that v is clearly inside (margin from inner borders), else None."""
        for k, name in enumerate(names):
            lo, hi = k * size / 3, (k + 1) * size / 3
            if lo + (margin if k else -1) <= v <= hi - (margin if k < 2 else -1):
                return name
        return None

    hz = zone(x, ("left", "centre", "right"))
    vz = zone(y, ("top", "middle", "bottom"))
    if hz is None or vz is None:
        return None
    if vz == "middle":
        return hz
    return vz if hz == "centre" else f"{vz} {hz}"


def _place_objects(
    rng: np.random.Generator, groups: list[_Group], size: int, axis: str | None, order: list[int]
) -> list[tuple[float, float, float, int]] | None:
    """Centres and radii (x, y, r, group) of all objects, or None when rejection sampling gives up.

    Group `order[k]` has its centres in band k of `axis`; objects do not overlap (bounding circles plus a gap), and
    objects of groups adjacent in `order` are clearly separated along the axis, so the relation words are true.
    """
    k = len(order)
    gap = 0.05 * size
    placed: list[tuple[float, float, float, int]] = []
    radii = {}
    for gi, g in enumerate(groups):
        lo, hi = _SIZE_RADIUS[g.size]
        radii[gi] = float(rng.uniform(lo, hi) * size)
    band_of = {gi: b for b, gi in enumerate(order)}
    for gi, g in enumerate(groups):
        r = radii[gi]
        edge = r + 0.03 * size
        for _ in range(g.count):
            for _attempt in range(60):
                x, y = (float(v) for v in rng.uniform(edge, size - edge, size=2))
                if axis is not None:
                    b = band_of[gi]
                    blo, bhi = max(edge, b * size / k), min(size - edge, (b + 1) * size / k)
                    if blo >= bhi:
                        return None
                    along = float(rng.uniform(blo, bhi))
                    x, y = (along, y) if axis == "x" else (x, along)
                ok = True
                for px, py, pr, pg in placed:
                    if math.hypot(px - x, py - y) < r + pr + gap:
                        ok = False
                        break
                    if axis is not None and pg != gi and abs(band_of[pg] - band_of[gi]) == 1:
                        d_along = abs(px - x) if axis == "x" else abs(py - y)
                        d_cross = abs(py - y) if axis == "x" else abs(px - x)
                        if d_along < 0.15 * size or d_along < 0.6 * d_cross:
                            ok = False
                            break
                if ok:
                    placed.append((x, y, r, gi))
                    break
            else:
                return None
    return placed


def _sample_scene(rng: np.random.Generator, size: int, domain: Domain = DOMAINS["quickstart"]) -> _Scene:
    """One random scene of a domain: background, groups of same-coloured same-shaped objects, positions."""
    background = domain.backgrounds[int(rng.integers(len(domain.backgrounds)))]
    brightness = "dark" if rng.random() < 0.6 else "light"
    value = rng.uniform(0.16, 0.32) if brightness == "dark" else rng.uniform(0.68, 0.84)
    bg_rgb = _hsv_to_rgb(float(rng.random()), float(rng.uniform(0.0, 0.18)), float(value))
    texture: dict[str, float] = {}
    if background == "noise":
        texture = {"std": float(rng.uniform(6.0, 10.0)), "seed": float(rng.integers(2**31))}
    elif background == "stripes":
        texture = {
            "angle": float(rng.choice([0.0, 45.0, 90.0, 135.0])),
            "period": float(rng.uniform(0.09, 0.16) * size),
            "amplitude": float(rng.uniform(10.0, 16.0)),
            "phase": float(rng.uniform(0, 2 * math.pi)),
        }
    elif background == "gradient":
        texture = {"angle": float(rng.uniform(0, 360.0)), "amplitude": float(rng.uniform(18.0, 30.0))}
    elif background in ("checkered", "dotted"):
        texture = {"period": float(rng.uniform(0.14, 0.22) * size), "amplitude": float(rng.uniform(12.0, 18.0)),
                   "offset": float(rng.uniform(0.0, 1.0))}
    palette = [c for c in domain.colours if c != ("white" if brightness == "light" else "black")]

    for attempt in range(200):
        counts = _group_structure(rng)
        combos: set[tuple[str, str]] = set()
        groups: list[_Group] = []
        for count in counts:
            while True:
                colour = palette[int(rng.integers(len(palette)))]
                shape = domain.shapes[int(rng.integers(len(domain.shapes)))]
                if (colour, shape) not in combos:
                    break
            combos.add((colour, shape))
            force_small = attempt >= 20 or (sum(counts) == 3 and rng.random() < 0.5)
            size_word = "small" if force_small or rng.random() < 0.5 else "large"
            groups.append(_Group(colour=colour, shape=shape, count=count, size=size_word))
        axis = None if len(groups) == 1 else ("x" if rng.random() < 0.5 else "y")
        order = [int(i) for i in rng.permutation(len(groups))]
        placed = _place_objects(rng, groups, size, axis, order)
        if placed is None:
            continue
        objects = []
        for x, y, r, gi in placed:
            g = groups[gi]
            base = np.array(ALL_COLOURS[g.colour], dtype=np.int64)
            rgb = np.clip(base + rng.integers(-12, 13, size=3), 0, 255)
            angle = float(rng.uniform(-10.0, 10.0)) if g.shape not in ("circle", "ring") else 0.0
            objects.append(
                _Object(g.shape, g.colour, g.size, x, y, r, angle, (int(rgb[0]), int(rgb[1]), int(rgb[2])), gi)
            )
        location = _location_of(objects[0].x, objects[0].y, size) if len(objects) == 1 else None
        return _Scene(
            background, brightness, bg_rgb, texture, tuple(groups), tuple(objects), axis, tuple(order), location
        )
    raise RuntimeError("could not place the objects of a synthetic scene")  # pragma: no cover - never observed


# ----------------------------------------------------------------------------------------------------------------------
# Rendering

_SUPERSAMPLE = 4


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with bounding radius r, rotated by angle degrees."""
    if shape == "square":
        h = 0.80 * r
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "diamond":
        pts = [(0.0, -r), (0.72 * r, 0.0), (0.0, r), (-0.72 * r, 0.0)]
    elif shape == "triangle":
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a)) + 0.22 * r) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = math.radians(-90 + 36 * i)
            pts.append((rad * math.cos(a), rad * math.sin(a) + 0.08 * r))
    elif shape == "heart":  # the classic parametric heart, its bounding radius r, point down
        pts = []
        for i in range(24):
            t = 2 * math.pi * i / 24
            hx = 16 * math.sin(t) ** 3
            hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((r * hx / 17, -r * (hy + 2.5) / 15))
    elif shape == "arrow":  # pointing right: a shaft and a head
        s, h = 0.22 * r, 0.65 * r
        pts = [(-r, -s), (0.15 * r, -s), (0.15 * r, -h), (r, 0.0), (0.15 * r, h), (0.15 * r, s), (-r, s)]
    elif shape == "cross":
        w, a = 0.33 * r, 0.95 * r
        pts = [
            (-w, -a),
            (w, -a),
            (w, -w),
            (a, -w),
            (a, w),
            (w, w),
            (w, a),
            (-w, a),
            (-w, w),
            (-a, w),
            (-a, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(f"not a polygonal shape: {shape!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in pts]


def _render_background(scene: _Scene, size: int) -> np.ndarray:
    """The (size, size, 3) float background: muted base colour plus a mild texture."""
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = np.asarray(scene.bg_rgb, dtype=np.float64)
    t = scene.texture
    if scene.background == "noise":
        noise_rng = np.random.default_rng(int(t["seed"]))
        img += noise_rng.normal(0.0, t["std"], size=(size, size, 1))
    elif scene.background in ("checkered", "dotted"):
        yy, xx = (np.mgrid[0:size, 0:size].astype(np.float64) / t["period"]) + t["offset"]
        if scene.background == "checkered":
            wave = np.where((np.floor(xx) + np.floor(yy)) % 2 == 0, 1.0, -1.0)
        else:  # dots of a quarter period's radius on a grid
            wave = np.where(np.hypot(xx - np.floor(xx) - 0.5, yy - np.floor(yy) - 0.5) < 0.25, 1.0, -0.2)
        img += (t["amplitude"] * wave)[..., None]
    elif scene.background in ("stripes", "gradient"):
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        a = math.radians(t["angle"])
        proj = xx * math.cos(a) + yy * math.sin(a)
        if scene.background == "stripes":
            wave = np.sign(np.sin(2 * math.pi * proj / t["period"] + t["phase"]))
            img += (t["amplitude"] * wave)[..., None]
        else:
            proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6) - 0.5
            img += (2 * t["amplitude"] * proj)[..., None]
    return img


def _render(scene: _Scene, size: int) -> np.ndarray:
    """The scene as an (size, size, 3) uint8 RGB array; shapes anti-aliased by supersampling."""
    img = _render_background(scene, size)
    ss = _SUPERSAMPLE
    for obj in scene.objects:
        x0 = max(0, int(math.floor(obj.x - obj.radius - 2)))
        y0 = max(0, int(math.floor(obj.y - obj.radius - 2)))
        x1 = min(size, int(math.ceil(obj.x + obj.radius + 2)))
        y1 = min(size, int(math.ceil(obj.y + obj.radius + 2)))
        mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy, r = (obj.x - x0) * ss, (obj.y - y0) * ss, obj.radius * ss
        if obj.shape in ("circle", "ring"):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            if obj.shape == "ring":
                hole = 0.55 * r
                draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r, obj.angle), fill=255)
        alpha = np.asarray(mask.reduce(ss), dtype=np.float64)[..., None] / 255.0
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch * (1.0 - alpha) + np.asarray(obj.rgb, dtype=np.float64) * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Captions


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    """A uniformly random element of a sequence."""
    return options[int(rng.integers(len(options)))]


def _noun_phrase(rng: np.random.Generator, g: _Group, with_size: bool) -> list[str]:
    """'a small red circle', 'two big violet boxes', ...: count word, optional size, colour, shape noun."""
    words = [_pick(rng, COUNT_WORDS[g.count])]
    if with_size:
        words.append(_pick(rng, SIZE_SYNONYMS[g.size]))
    words.append(_pick(rng, COLOUR_SYNONYMS[g.colour]))
    singular, plural = _pick(rng, SHAPE_NOUNS[g.shape])
    words.append(singular if g.count == 1 else plural)
    return words


def _fix_articles(words: list[str]) -> list[str]:
    """'a' before a vowel becomes 'an' ('an orange circle', 'an image')."""
    return [
        ("an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in _VOWELS else w) for i, w in enumerate(words)
    ]


_LOCATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "centre": ("in the middle", "in the centre"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
}


def _location_phrase(rng: np.random.Generator, location: str) -> str:
    """Words for a coarse location: 'in the top left corner', 'on the right', ..."""
    if location in _LOCATION_PHRASES:
        return _pick(rng, _LOCATION_PHRASES[location])
    return _pick(rng, (f"in the {location} corner", f"at the {location}"))


def _body(rng: np.random.Generator, scene: _Scene) -> tuple[list[str], int]:
    """The scene phrase (tokens, with commas as separate ',' tokens) and the count of its first noun phrase."""
    nps = [_noun_phrase(rng, g, rng.random() < 0.5) for g in scene.groups]
    if len(nps) == 1:
        words = list(nps[0])
        if scene.location is not None and rng.random() < 0.4:
            words += _location_phrase(rng, scene.location).split()
        return words, scene.groups[0].count
    ordered = [nps[i] for i in scene.order]
    first_count = {id(np_): scene.groups[i].count for i, np_ in enumerate(nps)}
    if len(nps) == 2:
        a, b = ordered
        if scene.axis == "x":
            forms = [
                (a + "to the left of".split() + b, a),
                (b + "to the right of".split() + a, b),
                (a + ["next", "to"] + b, a),
                (b + ["next", "to"] + a, b),
                (a + "on the left and".split() + b + "on the right".split(), a),
                (a + ["and"] + b, a),
                (b + ["and"] + a, b),
            ]
        else:
            forms = [
                (a + ["above"] + b, a),
                (b + ["below"] + a, b),
                (a + "at the top and".split() + b + "at the bottom".split(), a),
                (a + ["and"] + b, a),
                (b + ["and"] + a, b),
            ]
        words, head = _pick(rng, forms)
        return list(words), first_count[id(head)]
    a, b, c = ordered
    if scene.axis == "x":
        forms = [
            (a + "on the left ,".split() + b + "in the middle and".split() + c + "on the right".split(), a),
            (a + [","] + b + ["and"] + c + "from left to right".split(), a),
            (a + "to the left of".split() + b + "and".split() + c, a),
        ]
    else:
        forms = [
            (a + "at the top ,".split() + b + "in the middle and".split() + c + "at the bottom".split(), a),
            (a + [","] + b + ["and"] + c + "from top to bottom".split(), a),
            (a + ["above"] + b + ["and"] + c, a),
        ]
    perm = [nps[i] for i in rng.permutation(3)]
    forms.append((perm[0] + [","] + perm[1] + ["and"] + perm[2], perm[0]))
    words, head = _pick(rng, forms)
    return list(words), first_count[id(head)]


def _background_phrase(rng: np.random.Generator, scene: _Scene) -> list[str]:
    """'striped background', 'dark noisy background', ..."""
    words = []
    if rng.random() < 0.4:
        words.append(_pick(rng, BRIGHTNESS_WORDS[scene.brightness]))
    words.append(_pick(rng, BACKGROUND_WORDS[scene.background]))
    return words + ["background"]


def _sample_caption(rng: np.random.Generator, scene: _Scene) -> list[str]:
    """One caption as tokens (',' kept as a token for the raw text), before the length check."""
    body, head_count = _body(rng, scene)
    u = rng.random()
    if u < 0.25:
        bg = _background_phrase(rng, scene)
        if rng.random() < 0.5:
            return ["a"] + bg + ["with"] + body
        return body + [_pick(rng, ("on", "against")), "a"] + bg
    prefixes = [
        [],
        ["there", "is" if head_count == 1 else "are"],
        ["an", "image", "of"],
        ["a", "picture", "of"],
        ["a", "picture", "showing"],
        ["this", "image", "shows"],
        ["we", "can", "see"],
    ]
    words = _pick(rng, prefixes) + body
    if rng.random() < 0.15:
        words = words + ["on", "a"] + _background_phrase(rng, scene)
    return words


def _captions(rng: np.random.Generator, scene: _Scene, n: int) -> list[str]:
    """n distinct raw captions of 5 to 20 words (lowercase, commas allowed, no other punctuation)."""
    out: list[str] = []
    for _ in range(2000):
        words = _fix_articles(_sample_caption(rng, scene))
        n_words = sum(w != "," for w in words)
        if not 5 <= n_words <= 20:
            continue
        raw = " ".join(words).replace(" ,", ",")
        if raw not in out:
            out.append(raw)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not sample {n} distinct captions")  # pragma: no cover - the grammar is large enough


# ----------------------------------------------------------------------------------------------------------------------
# Ground truth


def _ground_truth_entry(scene: _Scene, split: str) -> dict[str, Any]:
    """The json-ready structured ground truth of one scene."""
    return {
        "split": split,
        "background": {"kind": scene.background, "brightness": scene.brightness, "rgb": list(scene.bg_rgb)},
        "objects": [
            {
                "shape": o.shape,
                "colour": o.colour,
                "size": o.size,
                "x": round(o.x, 2),
                "y": round(o.y, 2),
                "radius": round(o.radius, 2),
                "group": o.group,
            }
            for o in scene.objects
        ],
        "groups": [{"colour": g.colour, "shape": g.shape, "count": g.count, "size": g.size} for g in scene.groups],
        "layout": {"axis": scene.axis, "order": list(scene.order)},
        "location": scene.location,
    }


def caption_from_ground_truth(entry: Mapping[str, Any]) -> str:
    """A canonical, deterministic caption of one ground-truth entry (an oracle for metrics and tests).

    Uses canonical words only: groups in spatial order joined by the layout's relation ('to the left of', 'above',
    or 'a, b and c from left to right'), sizes included.
    """

    def phrase(g: Mapping[str, Any]) -> list[str]:
        """'a small red circle' with canonical words."""
        noun = SHAPE_NOUNS[g["shape"]][0][0 if g["count"] == 1 else 1]
        return [COUNT_WORDS[int(g["count"])][0], g["size"], g["colour"], noun]

    groups = list(entry["groups"])
    layout = entry.get("layout") or {}
    order = list(layout.get("order") or range(len(groups)))
    nps = [phrase(groups[i]) for i in order]
    axis = layout.get("axis")
    if len(nps) == 1:
        words = nps[0]
    elif len(nps) == 2:
        words = nps[0] + ("to the left of".split() if axis == "x" else ["above"]) + nps[1]
    else:
        words = (
            nps[0]
            + [","]
            + nps[1]
            + ["and"]
            + nps[2]
            + ("from left to right" if axis == "x" else "from top to bottom").split()
        )
    head = int(groups[order[0]]["count"])
    words = ["there", "is" if head == 1 else "are"] + words
    return " ".join(_fix_articles(words)).replace(" ,", ",")


def load_ground_truth(path: str | Path) -> dict[int, dict[str, Any]]:
    """The ground truth written by generate_synthetic_dataset, keyed by int image id."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {int(k): v for k, v in data["images"].items()}


# ----------------------------------------------------------------------------------------------------------------------
# Writing the dataset


def _marker_payload(config: SyntheticConfig) -> dict[str, Any]:
    """What the completion marker records: the generator version and the full config (the quickstart's domain left
    out, so datasets written before domains existed stay complete)."""
    recorded = asdict(config)
    if config.domain == "quickstart":
        del recorded["domain"]
    return {"generator": "data.synthetic", "version": GENERATOR_VERSION, "config": recorded}


def _read_json(path: Path) -> Any:
    """A json file's content, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _clear_outputs(out: Path) -> None:
    """Remove only what this generator writes (marker first, so a crash mid-way never looks complete)."""
    for name in (MARKER_NAME, JSON_NAME, GROUND_TRUTH_NAME, JSON_NAME + ".tmp", GROUND_TRUTH_NAME + ".tmp"):
        (out / name).unlink(missing_ok=True)
    if (out / IMAGES_DIR).is_dir():
        shutil.rmtree(out / IMAGES_DIR)
    (out / PARTIAL_MARKER_NAME).unlink(missing_ok=True)


def _is_complete(out: Path, config: SyntheticConfig) -> bool:
    """Whether out holds both json files and every image file of config (one directory listing, cheap)."""
    if not ((out / JSON_NAME).is_file() and (out / GROUND_TRUTH_NAME).is_file() and (out / IMAGES_DIR).is_dir()):
        return False
    present = set(os.listdir(out / IMAGES_DIR))
    return all(f"{imgid:06d}.png" in present for imgid in range(config.num_images))


def generate_synthetic_dataset(
    out_dir: str | Path,
    config: SyntheticConfig = SyntheticConfig(),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the synthetic dataset (images, Karpathy json, ground truth) to out_dir; return the json path.

    Deterministic: image i depends only on (seed, i), so the same config gives byte-identical files.
    Idempotent: if out_dir holds a complete output of the same config (marker file, written last, and every file
    present), return at once; an interrupted or damaged output of ours (partial marker, or same-config marker with
    files missing) is regenerated. Safe: refuse any other non-empty out_dir (foreign files, or a dataset with another
    config) unless overwrite, which removes only this generator's files (json files, markers, images/) first.
    """
    out = Path(out_dir)
    payload = _marker_payload(config)
    if _prepare_output(out, config, payload, overwrite):
        return out / JSON_NAME
    atomic_write_json(out / PARTIAL_MARKER_NAME, payload)
    images, truth = _write_images(out, config, progress)
    atomic_write_json(out / JSON_NAME, {"dataset": DATASET_NAME, "images": images})
    domain = {} if config.domain == "quickstart" else {"domain": config.domain}  # as the marker: files stay the same
    atomic_write_json(out / GROUND_TRUTH_NAME, {"version": GENERATOR_VERSION, "image_size": config.image_size,
                                                **domain, "images": truth})
    atomic_write_json(out / MARKER_NAME, payload)
    (out / PARTIAL_MARKER_NAME).unlink(missing_ok=True)
    return out / JSON_NAME


def _prepare_output(out: Path, config: SyntheticConfig, payload: dict[str, Any], overwrite: bool) -> bool:
    """True when out already holds this complete dataset; otherwise leave out empty of our files, or refuse."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        marker = _read_json(out / MARKER_NAME)
        if marker == payload and _is_complete(out, config):
            return True
        ours = marker == payload or (out / PARTIAL_MARKER_NAME).is_file()  # damaged or interrupted: redo it
        if not overwrite and not ours:
            found = "a synthetic dataset with a different config" if marker is not None else "other files"
            raise FileExistsError(
                f"refusing to write the synthetic dataset into non-empty {out}: it holds {found}; "
                "pass overwrite=True (--overwrite) or choose an empty directory"
            )
        _clear_outputs(out)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    return False


def _write_images(out: Path, config: SyntheticConfig, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Render every image into out/images; return the Karpathy json entries and the ground truth by id."""
    images: list[dict[str, Any]] = []
    truth: dict[str, Any] = {}
    for imgid in tqdm(range(config.num_images), desc="synthetic images", disable=not progress, unit="img"):
        split = config.split_of(imgid)
        scene = _sample_scene(np.random.default_rng([config.seed, imgid, 0]), config.image_size,
                              DOMAINS[config.domain])
        filename = f"{imgid:06d}.png"
        Image.fromarray(_render(scene, config.image_size), mode="RGB").save(
            out / IMAGES_DIR / filename, format="PNG", compress_level=6, optimize=False
        )
        raws = _captions(np.random.default_rng([config.seed, imgid, 1]), scene, config.captions_per_image)
        sentids = [imgid * config.captions_per_image + k for k in range(len(raws))]
        sentences = [{"raw": raw, "tokens": tokenize(raw), "imgid": imgid, "sentid": sid}
                     for raw, sid in zip(raws, sentids)]
        images.append({"filepath": IMAGES_DIR, "filename": filename, "imgid": imgid, "cocoid": imgid, "split": split,
                       "sentences": sentences, "sentids": sentids})
        truth[str(imgid)] = _ground_truth_entry(scene, split)
    return images, truth


@dataclass(frozen=True)
class _Command(SyntheticConfig):
    """The command line: the dataset's config plus where to write it."""

    output_path: str = option("", "output directory (created; must be empty or hold this generator's files)",
                              aliases=("--out",), required=True, group="data")
    overwrite: bool = option(False, "replace this generator's files in --output_path", group="data")
    quiet: bool = option(False, "no progress bar", group="runtime")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generate the dataset into --output_path and print the json path."""
    try:
        cmd, _ = parse_dataclass(_Command, list(argv) if argv is not None else None,
                                 "Generate the synthetic shapes captioning dataset (Karpathy json).")
        config = SyntheticConfig(**{f.name: getattr(cmd, f.name) for f in fields(SyntheticConfig)})
        path = generate_synthetic_dataset(cmd.output_path, config, overwrite=cmd.overwrite, progress=not cmd.quiet)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
