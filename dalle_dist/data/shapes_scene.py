"""The synthetic captioned-shapes set, part 1: the scene grammar, the renderer and the caption parser.

Sample ``i`` of a split is a pure function of ``(seed, split, i)``; :mod:`.shapes` has the design (why a
synthetic set, determinism, held-out pairs) and re-exports every public name, so import from there.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Saturated RGB corners: every pair is ≥ 255 apart, and each is ≥ 255 from the black background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
# Bounding-box side as a fraction of the image side. v2: a small object spans 3.8 tokens of the demo's 12×12 grid;
# v1's 0.20 spanned 2.4, too few for its shape to survive tokenization (docs/dvae.md). Two large objects in
# opposite cells of a lane still stay ≥ 1.8 px apart at 48 px (tested).
SIZES: dict[str, float] = {"small": 0.32, "large": 0.44}
POSITIONS: dict[str, tuple[int, int]] = {  # name → (row, col) on the 3×3 grid
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}  # fmt: skip
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TWO_OBJECT_FRACTION = 0.3
N_HELDOUT_PAIRS = 4
POS_JITTER = 0.04  # centre jitter, fraction of the side: keeps centres ≥ 0.12·side from a cell border
SIZE_JITTER = 0.05  # relative jitter of the object side
VERSION = "shapes-v2"

_SPLITS = {"train": 0, "heldout": 1}
_COLOUR_NAMES = list(COLOURS)
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_REL_WORDS = {"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of")}
_REL_WORDS.update({"above": ("above",), "below": ("below", "under")})
_SINGLE_TEMPLATES = ("a {obj} {pos}", "a picture of a {obj} {pos}", "an image of a {obj} {pos}")
_SINGLE_TEMPLATES += ("there is a {obj} {pos}", "{pos}, a {obj}", "a {obj}")
_PAIR_TEMPLATES = ("a {a} {rel} a {b}", "a picture of a {a} {rel} a {b}", "there is a {a} {rel} a {b}")
POSITIONS_V = ("top", "upper", "bottom", "lower")  # vertical words a caption may use
_REL_RE = re.compile(r"\b(to the left of|left of|to the right of|right of|above|below|under)\b")


@dataclass
class ObjectSpec:
    """What a caption says about one object; ``None`` means the caption does not say.

    ``relation`` (first object of a two-object caption only) relates it to the next object: "left of" etc.
    """

    colour: str
    shape: str
    size: str | None = None
    position: str | None = None
    relation: str | None = None


@dataclass
class Sample:
    key: str
    image: np.ndarray  # (S, S, 3) uint8
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points (u, v) in the shape's unit box [-1, 1]² (v grows downwards). Shared by the
    renderer and the judge's templates, so ground truth and template agree exactly."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # apex up, base down
        return (np.abs(v) <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "cross":  # a plus sign, arms a third of the side wide
        arm = 1.0 / 3.0
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def heldout_pairs(seed: int = 0, n: int = N_HELDOUT_PAIRS) -> list[tuple[str, str]]:
    """(colour, shape) pairs never drawn in training: distinct colours and distinct shapes, so every colour and
    every shape is still seen in training with other partners (a zero-shot test needs both parts known)."""
    if not 0 <= n <= min(len(COLOURS), len(SHAPES)):
        raise ValueError(f"n held-out pairs must lie in [0, {min(len(COLOURS), len(SHAPES))}], got {n}")
    rng = np.random.default_rng([seed, 7919])
    colours = [_COLOUR_NAMES[i] for i in rng.permutation(len(COLOURS))[:n]]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    return sorted(zip(colours, shapes))


def _object_phrase(obj: dict[str, Any], with_size: bool, rng: np.random.Generator) -> str:
    words = [_SIZE_WORDS[obj["size"]][rng.integers(2)]] if with_size else []
    return " ".join([*words, obj["colour"], obj["shape"]])


def _position_phrase(pos: str, rng: np.random.Generator) -> str:
    if pos == "center":
        options = ("in the center", "in the middle")
    elif " " in pos:
        options = (f"in the {pos} corner", f"at the {pos}", f"on the {pos}")
    elif pos in ("top", "bottom"):
        options = (f"at the {pos}", f"near the {pos}")
    else:
        options = (f"on the {pos}", f"on the {pos} side", f"at the {pos}")
    return options[rng.integers(len(options))]


def _layout(rng: np.random.Generator, n_obj: int) -> tuple[list[str], str | None]:
    """Cells of the objects and the relation of object 0 to object 1 (two objects share a row or column)."""
    names = list(POSITIONS)
    if n_obj == 1:
        return [names[rng.integers(len(names))]], None
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    lane = int(rng.integers(3))
    ends = (0, 2) if relation in ("left of", "above") else (2, 0)
    if relation in ("left of", "right of"):
        cells = [(lane, ends[0]), (lane, ends[1])]
    else:
        cells = [(ends[0], lane), (ends[1], lane)]
    by_cell = {rc: name for name, rc in POSITIONS.items()}
    return [by_cell[c] for c in cells], relation


def _caption(objects: list[dict[str, Any]], relation: str | None, rng: np.random.Generator) -> tuple[str, int]:
    """A caption from one of several templates, and the template's index; size words appear half the time."""
    with_size = bool(rng.random() < 0.5)
    if relation is None:
        t = int(rng.integers(len(_SINGLE_TEMPLATES)))
        # The template without a position always names the size, so every caption states ≥ 3 attributes.
        obj = _object_phrase(objects[0], with_size or t == len(_SINGLE_TEMPLATES) - 1, rng)
        return _SINGLE_TEMPLATES[t].format(obj=obj, pos=_position_phrase(objects[0]["position"], rng)), t
    t = int(rng.integers(len(_PAIR_TEMPLATES)))
    a, b = (_object_phrase(o, with_size, rng) for o in objects)
    rel_words = _REL_WORDS[relation]
    return _PAIR_TEMPLATES[t].format(a=a, b=b, rel=rel_words[rng.integers(len(rel_words))]), t


def generate_sample(
    seed: int, index: int, size: int = 64, split: str = "train", heldout: Sequence[tuple[str, str]] | None = None
) -> Sample:
    """Sample ``index`` of ``split``: a pure function of its arguments."""
    held = [tuple(p) for p in (heldout_pairs(seed) if heldout is None else heldout)]
    seen = [p for p in itertools.product(_COLOUR_NAMES, SHAPES) if p not in held]
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    n_obj = 2 if rng.random() < TWO_OBJECT_FRACTION else 1
    pairs = [seen[rng.integers(len(seen))] for _ in range(n_obj)]
    if split == "heldout":
        if not held:
            raise ValueError("the heldout split needs at least one held-out pair")
        pairs[rng.integers(n_obj)] = held[rng.integers(len(held))]
    cells, relation = _layout(rng, n_obj)
    img = np.zeros((size, size, 3), dtype=np.uint8)  # black background
    centres = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    objects = []
    for (colour, shape), cell in zip(pairs, cells):
        obj_size = list(SIZES)[rng.integers(len(SIZES))]
        half = SIZES[obj_size] * size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) / 2
        row, col = POSITIONS[cell]
        cx, cy = ((np.array([col, row]) + 0.5) / 3 + rng.uniform(-POS_JITTER, POS_JITTER, 2)) * size
        cx, cy = (float(np.clip(c, half + 1, size - 1 - half)) for c in (cx, cy))
        mask = _inside(shape, (centres[None, :] - cx) / half, (centres[:, None] - cy) / half)  # (S, S)
        img[mask] = COLOURS[colour]
        objects.append(dict(colour=colour, shape=shape, size=obj_size, position=cell, cx=round(cx, 3)))
        objects[-1].update(cy=round(cy, 3), side=round(2 * half, 3))
    caption, t = _caption(objects, relation, rng)
    key = f"{index:09d}"
    is_held = any(p in held for p in pairs)
    meta = dict(key=key, caption=caption, split=split, seed=seed, index=index, image_size=size, template=t)
    meta.update(relation=relation, objects=objects, heldout=is_held)
    return Sample(key=key, image=img, caption=caption, meta=meta)


# --------------------------------------------------------------------------------------------------
# Captions → attributes
# --------------------------------------------------------------------------------------------------


def _parse_object(phrase: str, with_position: bool) -> ObjectSpec:
    words = re.findall(r"[a-z]+", phrase)
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if colour is None or shape is None:
        raise ValueError(f"cannot find a colour {tuple(COLOURS)} and a shape {SHAPES} in {phrase.strip()!r}")
    size = next((s for w in words for s, syn in _SIZE_WORDS.items() if w in syn), None)
    position = None
    if with_position:
        vert = next(({"upper": "top", "lower": "bottom"}.get(w, w) for w in words if w in POSITIONS_V), None)
        horiz = next((w for w in words if w in ("left", "right")), None)
        named = " ".join(p for p in (vert, horiz) if p)
        position = named or ("center" if {"center", "middle", "centre"} & set(words) else None)
    return ObjectSpec(colour=colour, shape=shape, size=size, position=position)


def parse_caption(text: str) -> list[ObjectSpec]:
    """Attributes a caption of this set states, e.g. "a small red circle on the left" → one ObjectSpec."""
    t = text.lower()
    m = _REL_RE.search(t)
    if m is None:
        return [_parse_object(t, with_position=True)]
    relation = next(r for r, words in _REL_WORDS.items() if m.group(1) in words)
    first = _parse_object(t[: m.start()], with_position=False)
    first.relation = relation
    return [first, _parse_object(t[m.end() :], with_position=False)]
