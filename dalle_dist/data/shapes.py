"""The built-in synthetic captioned-shapes set, and the judge that scores an image against a caption.

Why a synthetic set: the CPU tests and ``make demo`` need image-caption pairs that a tiny dVAE (64 px → 8×8
tokens) and a tiny prior can learn in minutes, with captions whose truth can be checked automatically, so that
zero-shot composition [P §3] can be measured on attribute combinations held out of training.

- **Scenes**: a black background and one or two axis-aligned objects. Colours are far apart in RGB
  (:data:`COLOURS`), shapes differ in silhouette (:data:`SHAPES`), two sizes, nine positions on a 3×3 grid;
  two objects sit in opposite columns (or rows) of one lane, so "left of" / "above" are unambiguous.
- **Determinism**: sample ``i`` of a split is a pure function of ``(seed, split, i)``, so any subset can be
  regenerated; PNG (lossless) and tar members with mtime 0 make shards byte-identical across runs.
- **Held-out**: :func:`heldout_pairs` fixes (colour, shape) pairs from the seed; training never draws them, the
  ``heldout/`` shards always contain one.
- **Judge**: pixels far from the background get the palette colour nearest to their chroma (colour / max
  channel, which a blur towards black leaves unchanged); 4-connected components of one colour are objects;
  shape, size and centre come from fitting blurred templates to each component, so a soft reconstruction is
  still judged right. docs/synthetic.md has the method and the measured accuracy.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import os
import re
import sys
import time
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
SIZE_SPLIT = 0.375  # the judge's threshold between the two sizes (box side / image side): their geometric mean
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
FG_THRESHOLD = 96.0  # a pixel is foreground when its brightest channel exceeds this
VERSION = "shapes-v2"

_SPLITS = {"train": 0, "heldout": 1}
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (C, 3)
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


# --------------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------------


@dataclass
class Detection:
    colour: str
    shape: str
    size: str
    position: str
    cx: float  # centre in pixels (x right, y down)
    cy: float
    side: float  # fitted side / image side
    area: int  # foreground pixels


def _label(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative class: each pixel gets the smallest index in its
    component (background: H·W). Min-label propagation plus pointer jumping, all in numpy."""
    h, w = cls.shape
    none = h * w
    valid = cls >= 0
    lab = np.where(valid, np.arange(h * w).reshape(h, w), none)
    same_v = valid[1:] & (cls[1:] == cls[:-1])  # (H-1, W): pixel and the one above belong together
    same_h = valid[:, 1:] & (cls[:, 1:] == cls[:, :-1])  # (H, W-1)
    while True:
        new = lab.copy()
        np.minimum(new[1:], np.where(same_v, lab[:-1], none), out=new[1:])
        np.minimum(new[:-1], np.where(same_v, lab[1:], none), out=new[:-1])
        np.minimum(new[:, 1:], np.where(same_h, lab[:, :-1], none), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_h, lab[:, 1:], none), out=new[:, :-1])
        new = np.append(new.ravel(), none)[new]  # jump to the label of the pixel my label names
        if np.array_equal(new, lab):
            return lab
        lab = new


def _unit_moments(shape: str, n: int = 256) -> tuple[float, float, float, float]:
    """Centroid (u, v) and variances (u, v) of a shape of half-side 1 (a triangle's centroid is below centre)."""
    g = (np.arange(n) + 0.5) / (n / 2) - 1
    uu, vv = np.meshgrid(g, g)
    m = _inside(shape, uu, vv)
    cu, cv = uu[m].mean(), vv[m].mean()
    return float(cu), float(cv), float(((uu[m] - cu) ** 2).mean()), float(((vv[m] - cv) ** 2).mean())


_MOMENTS = {s: _unit_moments(s) for s in SHAPES}
_FIT_SIGMAS = (0.0, 0.7, 1.4, 2.1)  # blur levels (px) a template may be smoothed by; 0: sharp
_SUPER = 2  # template supersampling per axis (area coverage of edge pixels)


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) row-normalised Gaussian smoothing along one axis; identity for sigma 0."""
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    i = np.arange(n, dtype=np.float32)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return (k / k.sum(1, keepdims=True)).astype(np.float32)


def _fit_shape(a: np.ndarray) -> tuple[str, float, float, float]:
    """Best (shape, cx, cy, half side) for an intensity window ``a`` (object ≈ 1, background ≈ 0).

    For each shape and blur level the geometry follows from the window's moments (blur adds σ² to each
    variance), the template is drawn with that geometry, blurred, scaled by least squares, and the smallest
    residual wins. Fitting blurred templates keeps a soft circle from looking like a square and a blurred
    cross from looking like a diamond, which a thresholded mask does not."""
    h, w = a.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    tot = max(float(a.sum()), 1e-6)
    mx, my = float((a * xx).sum()) / tot, float((a * yy).sum()) / tot
    var = float((a * ((xx - mx) ** 2 + (yy - my) ** 2)).sum()) / tot
    sub = (np.arange(_SUPER, dtype=np.float32) + 0.5) / _SUPER
    px, py = (np.arange(w)[:, None] + sub).ravel(), (np.arange(h)[:, None] + sub).ravel()
    best = (np.inf, SHAPES[0], mx, my, np.sqrt(max(var, 1.0)))
    for shape, (cu, cv, ku, kv) in _MOMENTS.items():
        for sigma in _FIT_SIGMAS:
            half2 = (var - 2 * sigma**2) / (ku + kv)
            if half2 <= 1.0:  # the blur alone explains the spread: not this σ
                continue
            half = float(np.sqrt(half2))
            cx, cy = mx - cu * half, my - cv * half
            t = _inside(shape, (px[None, :] - cx) / half, (py[:, None] - cy) / half).astype(np.float32)
            t = t.reshape(h, _SUPER, w, _SUPER).mean((1, 3))  # (h, w) area coverage
            t = _blur_matrix(h, sigma) @ t @ _blur_matrix(w, sigma).T
            scale = float((a * t).sum()) / max(float((t * t).sum()), 1e-6)
            resid = float(((a - scale * t) ** 2).sum())
            if resid < best[0]:
                best = (resid, shape, cx, cy, half)
    return best[1], best[2], best[3], best[4]


def detect_objects(img: np.ndarray, min_area: int | None = None) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 image, largest first."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}; from floats in [0, 1] use "
            "(x * 255).round().astype(np.uint8)"
        )
    h, w = img.shape[:2]
    min_area = max(6, int(0.004 * h * w)) if min_area is None else min_area  # drops noise specks
    x = img.astype(np.float32)
    peak = x.max(axis=2)  # (H, W)
    fg = peak > FG_THRESHOLD
    cls = np.full((h, w), -1, dtype=np.int64)
    if not fg.any():
        return []
    chroma = x[fg] * (255.0 / peak[fg])[:, None]  # (N, 3): blur towards black keeps the chroma
    cls[fg] = ((chroma[:, None, :] - _PALETTE[None]) ** 2).sum(-1).argmin(1)
    floor = 2 * float(np.median(peak[~fg])) if (~fg).any() else 0.0  # background noise level
    lab = _label(cls)
    ids, counts = np.unique(lab[fg], return_counts=True)
    out = []
    for i, area in zip(ids, counts):
        if area < min_area:
            continue
        ys, xs = np.nonzero(lab == i)
        pad = 4  # room for the blurred fringe below the foreground threshold
        y0, y1 = max(ys.min() - pad, 0), min(ys.max() + 1 + pad, h)
        x0, x1 = max(xs.min() - pad, 0), min(xs.max() + 1 + pad, w)
        ref = float(np.percentile(peak[ys, xs], 98))
        win = np.clip((peak[y0:y1, x0:x1] - floor) / max(ref - floor, 1.0), 0.0, 1.0)
        win[fg[y0:y1, x0:x1] & (lab[y0:y1, x0:x1] != i)] = 0.0  # other objects are not part of this one
        shape, cx, cy, half = _fit_shape(win)
        cx, cy = cx + x0, cy + y0
        cell = (min(max(int(3 * cy / h), 0), 2), min(max(int(3 * cx / w), 0), 2))
        pos = next(name for name, rc in POSITIONS.items() if rc == cell)
        side = 2 * half / min(h, w)
        size = "large" if side > SIZE_SPLIT else "small"
        out.append(Detection(_COLOUR_NAMES[cls.flat[i]], shape, size, pos, cx, cy, side, int(area)))
    return sorted(out, key=lambda d: -d.area)


def _relation_holds(rel: str, a: Detection, b: Detection, h: int, w: int) -> bool:
    """A's centre at least an eighth of the image beyond B's in the named direction."""
    dx, dy = (b.cx - a.cx) / w, (b.cy - a.cy) / h
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[rel] > 1 / 8


def _checks(specs: list[ObjectSpec], dets: list[Detection | None], h: int, w: int) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for k, (spec, d) in enumerate(zip(specs, dets)):
        out[f"{k}.colour"] = d is not None and d.colour == spec.colour
        out[f"{k}.shape"] = d is not None and d.shape == spec.shape
        if spec.size is not None:
            out[f"{k}.size"] = d is not None and d.size == spec.size
        if spec.position is not None:
            out[f"{k}.position"] = d is not None and d.position == spec.position
    if len(specs) > 1 and specs[0].relation is not None:
        a, b = dets[0], dets[1]
        out["relation"] = a is not None and b is not None and _relation_holds(specs[0].relation, a, b, h, w)
    return out


def judge_image(img: np.ndarray, caption_or_attrs: str | Sequence[ObjectSpec]) -> dict[str, bool]:
    """Which stated attributes the image satisfies: keys ``"{k}.colour"``, ``"{k}.shape"``, ``"{k}.size"``,
    ``"{k}.position"`` for the k-th object the caption names (size and position only when stated) and
    ``"relation"`` for two-object captions. Caption objects are matched to detected objects by the assignment
    that satisfies the most attributes (ties: larger objects), so extra clutter is not penalised."""
    specs = parse_caption(caption_or_attrs) if isinstance(caption_or_attrs, str) else list(caption_or_attrs)
    if not specs:
        raise ValueError("the caption names no object to judge")
    h, w = img.shape[:2]
    dets = detect_objects(img)[:8]  # bound the assignment search
    options: list[Detection | None] = [*dets, *([None] * len(specs))]
    best: dict[str, bool] | None = None
    for assign in itertools.permutations(range(len(options)), len(specs)):
        checks = _checks(specs, [options[i] for i in assign], h, w)
        if best is None or sum(checks.values()) > sum(best.values()):
            best = checks
    assert best is not None
    return best


def caption_match(img: np.ndarray, caption_or_attrs: str | Sequence[ObjectSpec]) -> float:
    """Fraction of the caption's attributes the image satisfies (1.0: all)."""
    checks = judge_image(img, caption_or_attrs)
    return sum(checks.values()) / len(checks)


def attribute_name(check_key: str) -> str:
    """``"1.colour"`` → ``"colour"``: the per-attribute aggregate key of a judge result key."""
    return check_key.split(".", 1)[-1]


# --------------------------------------------------------------------------------------------------
# Writing shards and the CLI
# --------------------------------------------------------------------------------------------------


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _write_split(pattern: str, n: int, seed: int, size: int, shard_size: int, split: str, held: list) -> list[str]:
    import webdataset as wds

    if n == 0:
        return []
    os.makedirs(os.path.dirname(pattern), exist_ok=True)
    t0 = last = time.monotonic()
    # mtime=0 and our own encoding (encoder=False): identical bytes on every run.
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0.0, encoder=False) as sink:
        for i in range(n):
            s = generate_sample(seed, i, size, split, held)
            meta = json.dumps(s.meta, sort_keys=True).encode()
            sink.write({"__key__": s.key, "png": _png(s.image), "txt": s.caption.encode(), "json": meta})
            if time.monotonic() - last > 10:
                last = time.monotonic()
                print(f"shapes: {split} {i + 1:,}/{n:,} ({(i + 1) / (last - t0):,.0f}/s)", file=sys.stderr)
    return [pattern % k for k in range((n + shard_size - 1) // shard_size)]


def write_shapes(
    out: str, n: int, n_heldout: int = 0, size: int = 64, shard_size: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Write ``{out}/train-%06d.tar``, ``{out}/heldout/heldout-%06d.tar``, ``heldout.json`` and
    ``manifest.json``; returns the manifest."""
    if size < 48:
        raise ValueError(f"--size {size}: objects need at least 48 px images to be drawn and judged reliably")
    if n < 0 or n_heldout < 0 or shard_size < 1 or seed < 0:
        raise ValueError("--n, --n-heldout and --seed must be >= 0 and --shard-size >= 1")
    held = heldout_pairs(seed)
    train = _write_split(os.path.join(out, "train-%06d.tar"), n, seed, size, shard_size, "train", held)
    held_shards = _write_split(
        os.path.join(out, "heldout", "heldout-%06d.tar"), n_heldout, seed, size, shard_size, "heldout", held
    )
    rel = [os.path.relpath(p, out) for p in held_shards]
    heldout_doc = dict(pairs=[list(p) for p in held], n=n_heldout, shards=rel, seed=seed)
    manifest = dict(version=VERSION, seed=seed, image_size=size, n_train=n, n_heldout=n_heldout)
    manifest.update(shard_size=shard_size, train_shards=[os.path.relpath(p, out) for p in train], heldout_shards=rel)
    manifest.update(colours=COLOURS, shapes=list(SHAPES), sizes=SIZES, positions=list(POSITIONS))
    manifest.update(
        relations=list(RELATIONS), heldout_pairs=heldout_doc["pairs"], two_object_fraction=TWO_OBJECT_FRACTION
    )
    manifest.update(templates=dict(single=list(_SINGLE_TEMPLATES), pair=list(_PAIR_TEMPLATES)))
    os.makedirs(out, exist_ok=True)
    for name, doc in (("heldout.json", heldout_doc), ("manifest.json", manifest)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
    return manifest


def cli_shapes(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        m = write_shapes(args.out, args.n, args.n_heldout, args.size, args.shard_size, args.seed)
    except ValueError as err:
        print(f"dalle-dist data shapes: {err}", file=sys.stderr)
        return 2
    keys = ("n_train", "n_heldout", "train_shards", "heldout_shards", "heldout_pairs", "image_size", "seed")
    print(json.dumps({"out": args.out, **{k: m[k] for k in keys}, "seconds": round(time.monotonic() - t0, 3)}))
    return 0


def judge_shards(spec: str) -> dict[str, Any]:
    """Judge every image of the shards against its own caption; the accuracy summary."""
    from PIL import Image

    from .tokenizer import check_local_shards, expand_shards

    urls = expand_shards(spec)
    check_local_shards(urls)
    import webdataset as wds  # imports torch: seconds, so only once the shards are known to exist

    n, errors, total, exact = 0, 0, 0.0, 0
    hits: dict[str, list[int]] = {}
    for sample in wds.tarfile_samples([{"url": u} for u in urls], handler=wds.warn_and_continue):
        data = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        try:
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # type: ignore[arg-type]
            checks = judge_image(img, sample["txt"].decode("utf-8"))
        except Exception:  # a missing image/caption or an unparseable caption: counted, not fatal
            errors += 1
            continue
        n += 1
        total += sum(checks.values()) / len(checks)
        exact += all(checks.values())
        for k, ok in checks.items():
            hits.setdefault(attribute_name(k), [0, 0])[0] += int(ok)
            hits[attribute_name(k)][1] += 1
    per = {k: round(a / b, 5) for k, (a, b) in sorted(hits.items())}
    summary = dict(n=n, caption_match=round(total / max(n, 1), 5), exact=round(exact / max(n, 1), 5))
    return {**summary, "per_attribute": per, "errors": errors}


def cli_judge(args: argparse.Namespace) -> int:
    try:
        result = judge_shards(args.shards)
    except (FileNotFoundError, ValueError) as err:
        print(f"dalle-dist data judge: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"judged {result['n']} images: caption match {result['caption_match']:.4f}, exact {result['exact']:.4f}")
        for k, v in result["per_attribute"].items():
            print(f"  {k:<10} {v:.4f}")
    return 0
