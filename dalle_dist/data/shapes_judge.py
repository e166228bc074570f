"""The synthetic captioned-shapes set, part 2: the judge that scores an image against a caption.

Pixels far from the background get the palette colour nearest to their chroma (colour / max channel, which a blur
towards black leaves unchanged); 4-connected components of one colour are objects; shape, size and centre come
from fitting blurred templates to each component, so a soft reconstruction is still judged right.
docs/synthetic.md has the method and the measured accuracy; :mod:`.shapes` re-exports every public name.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .shapes_scene import _COLOUR_NAMES, COLOURS, POSITIONS, SHAPES, ObjectSpec, _inside, parse_caption

SIZE_SPLIT = 0.375  # the judge's threshold between the two sizes (box side / image side): their geometric mean
FG_THRESHOLD = 96.0  # a pixel is foreground when its brightest channel exceeds this
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (C, 3)


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


@dataclass
class JudgeTally:
    """Running totals of :func:`judge_image` results over many images, as ``data judge`` and ``eval --judge``
    report them: mean caption match, fraction of images exact (every attribute), accuracy per attribute."""

    n: int = 0  # images judged
    total: float = 0.0  # sum of their caption matches
    exact: int = 0  # images satisfying every stated attribute
    errors: int = 0  # images not judged: no caption, or one the caption grammar cannot parse
    hits: dict[str, list[int]] = field(default_factory=dict)  # attribute → [satisfied, stated]

    def add(self, checks: dict[str, bool]) -> None:
        """Count one image's :func:`judge_image` result."""
        self.n += 1
        self.total += sum(checks.values()) / len(checks)
        self.exact += all(checks.values())
        for key, ok in checks.items():
            counts = self.hits.setdefault(attribute_name(key), [0, 0])
            counts[0] += int(ok)
            counts[1] += 1

    def summary(self, digits: int | None = None) -> dict[str, Any]:
        """``{n, caption_match, exact, per_attribute, errors}``; the fractions rounded to ``digits`` when given."""

        def frac(a: float, b: int) -> float:
            return a / max(b, 1) if digits is None else round(a / max(b, 1), digits)

        per = {k: frac(a, b) for k, (a, b) in sorted(self.hits.items())}
        matched = dict(caption_match=frac(self.total, self.n), exact=frac(self.exact, self.n))
        return dict(n=self.n, **matched, per_attribute=per, errors=self.errors)
