"""The paper's two augmentation listings, the area resize they use, and the caption/image filters.

Listing 1 (dVAE) and Listing 2 (prior) [P §2.1, App. A.2, B.2] are TensorFlow; this is the same arithmetic in
numpy. Each listing is split into drawing its random parameters (:func:`draw_dvae_params`,
:func:`draw_prior_params`) and applying them (:func:`apply_params`), so tests can check the distributions of
t and of the crop offsets directly. All randomness comes from the ``np.random.Generator`` passed in.

Area resize. ``tf.image.resize_images(..., method=AREA, align_corners=True)`` averages, for output row y, the
input rows overlapping ``[y·σ, (y+1)·σ)`` weighted by the overlap, with σ = (s−1)/(t−1) (align_corners) and
rows past the edge clamped to the last one (TF's ``ResizeAreaOp``). :func:`area_resize` applies exactly those
overlap weights, per axis, as a band of ⌈σ⌉+1 taps per output row, in float32 like TF's kernel, so the listing's
``rint`` and ``clip`` then act on the numbers TF produces (to float32 rounding). PIL's ``BOX`` filter is not the same
thing: it gives each input pixel weight 0 or 1 by its centre, no fractional overlaps.

Images smaller than R. Both listings assume s = min(h, w) ≥ R; with s < R their t would fall below R and the
final crop of R would not exist. Here t is raised to R in that case: the s×s crop is **upscaled** to R×R with
bicubic interpolation (area averaging has nothing to average when upscaling), then rint + clip as usual.
Images with s < ``min_side`` (default R/2, i.e. at most 2× upscaling) are skipped earlier as image_too_small.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------------------------------
# Area resize (TF AREA, align_corners=True)
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def area_weights(s: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """TF's overlap weights for one axis: input rows idx (t, m) and weights (t, m), each row summing to 1.

    Output row y covers [y·σ, (y+1)·σ) with σ = (s−1)/(t−1) (align_corners; s/t when t = 1); input row i gets
    the length of [i, i+1) ∩ that window, rows past the edge are clamped to row s−1, and the sum is divided
    by σ. A transliteration of TF's ``ResizeAreaOp`` loop, kept as (t, m) bands because m ≤ ⌈σ⌉ + 1.
    """
    sigma = (s - 1) / (t - 1) if t > 1 else s / t
    lo = np.arange(t, dtype=np.float64) * sigma  # (t,) window starts
    hi = lo + sigma  # (t,) window ends
    first = np.floor(lo).astype(np.int64)  # (t,)
    m = int((np.ceil(hi) - first).max())
    rows = first[:, None] + np.arange(m)[None, :]  # (t, m) candidate input rows
    overlap = np.minimum(rows + 1, hi[:, None]) - np.maximum(rows, lo[:, None])  # (t, m)
    weights = np.clip(overlap, 0.0, None) / sigma  # (t, m)
    return np.minimum(rows, s - 1), weights.astype(np.float32)


def _area_axis0(x: np.ndarray, t: int) -> np.ndarray:
    """Area-resize axis 0 of ``x`` (s, ...) (uint8 or float32) to t entries, float32 out."""
    idx, w = area_weights(x.shape[0], t)  # (t, m), (t, m)
    shape = (t,) + (1,) * (x.ndim - 1)
    # Whole-row gathers stay contiguous; gathering uint8 rows and widening in the multiply moves 4× fewer bytes.
    out = w[:, 0].reshape(shape) * x[idx[:, 0]]  # (t, ...) float32
    for j in range(1, idx.shape[1]):  # one tap at a time: memory stays O(t·s), not O(t·m·s)
        out += w[:, j].reshape(shape) * x[idx[:, j]]
    return out


def area_resize(img: np.ndarray, t: int) -> np.ndarray:
    """Square (s, s, C) image → (t, t, C) float32, TF ``ResizeMethod.AREA`` with ``align_corners=True``."""
    if img.ndim != 3 or img.shape[0] != img.shape[1]:
        raise ValueError(f"area_resize expects a square (s, s, C) image, got {img.shape}")
    x = _area_axis0(img, t)  # (t, s, C) float32 (like TF's kernel): rows
    x = np.ascontiguousarray(x.transpose(1, 0, 2))  # (s, t, C)
    x = _area_axis0(x, t)  # (t, t, C): columns, as rows of the transpose
    return x.transpose(1, 0, 2)  # (t, t, C)


def _bicubic_up(img: np.ndarray, t: int) -> np.ndarray:
    """(s, s, C) uint8 → (t, t, C) float32 with PIL's bicubic, per channel in float (no internal rounding)."""
    chans = [
        np.asarray(Image.fromarray(img[:, :, c].astype(np.float32), mode="F").resize((t, t), Image.BICUBIC))
        for c in range(img.shape[2])
    ]
    return np.stack(chans, axis=2)  # (t, t, C)


def resize_square(img: np.ndarray, t: int) -> np.ndarray:
    """Resize a square uint8 crop to t×t: area when shrinking (or same size), bicubic when growing; rint + clip."""
    s = img.shape[0]
    if t == s:
        return img
    x = area_resize(img, t) if t < s else _bicubic_up(img, t)  # (t, t, C) float
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)  # the listings' rint + clip to uint8


# --------------------------------------------------------------------------------------------------
# The listings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentParams:
    """One draw of a listing: square crop (top, left, s), resize side t, crop of R at (y, x), flip."""

    top: int
    left: int
    s: int
    t: int
    y: int
    x: int
    flip: bool


def _uniform_int(rng: np.random.Generator, lo: int, hi_exclusive: int) -> int:
    # tf.random.uniform([], lo, hi, dtype=int32): integers in [lo, hi).
    return int(rng.integers(lo, hi_exclusive))


def draw_dvae_params(h: int, w: int, R: int, rng: np.random.Generator) -> AugmentParams:
    """Listing 1 [P App. A.2]: random s×s crop, t ~ U{min(s, round(9R/8)) … min(s, round(12R/8))}, crop R, flip."""
    s = min(h, w)
    top = _uniform_int(rng, 0, h - s + 1)  # tf.image.random_crop to (s, s)
    left = _uniform_int(rng, 0, w - s + 1)
    t_min, t_max = min(s, round(9 / 8 * R)), min(s, round(12 / 8 * R))
    t = _uniform_int(rng, t_min, t_max + 1)
    t = max(t, R)  # s < R: upscale to R (module docstring)
    y, x = _uniform_int(rng, 0, t - R + 1), _uniform_int(rng, 0, t - R + 1)  # random_crop to (R, R)
    flip = bool(rng.random() < 0.5)  # random_flip_left_right
    return AugmentParams(top, left, s, t, y, x, flip)


def _near_centre_offset(d: int, rng: np.random.Generator) -> int:
    # Listing 2: uniform in [3d//8, max(3d//8 + 1, 5d//8)) with d = side − s (int32 floor division).
    lo = 3 * d // 8
    return _uniform_int(rng, lo, max(lo + 1, 5 * d // 8))


def draw_prior_params(h: int, w: int, R: int, rng: np.random.Generator) -> AugmentParams:
    """Listing 2 [P B.2]: near-centre full square crop, t ~ U{R … min(s, round(9R/8))}, crop R, never a flip."""
    s = min(h, w)
    top, left = _near_centre_offset(h - s, rng), _near_centre_offset(w - s, rng)
    t_max = min(s, round(9 / 8 * R))
    t = _uniform_int(rng, R, t_max + 1) if t_max >= R else R  # s < R: upscale to R (module docstring)
    y, x = _uniform_int(rng, 0, t - R + 1), _uniform_int(rng, 0, t - R + 1)
    # No horizontal flip: "the image may contain text" [P B.2].
    return AugmentParams(top, left, s, t, y, x, False)


def centre_params(h: int, w: int, R: int) -> AugmentParams:
    """Deterministic eval/pretokenize preprocessing: centre s×s crop resized to R×R (t = R), no flip."""
    s = min(h, w)
    return AugmentParams((h - s) // 2, (w - s) // 2, s, R, 0, 0, False)


def apply_params(img: np.ndarray, p: AugmentParams, R: int) -> np.ndarray:
    """Apply one draw to an RGB uint8 (H, W, 3) image → (R, R, 3) uint8."""
    crop = img[p.top : p.top + p.s, p.left : p.left + p.s]  # (s, s, 3)
    resized = resize_square(crop, p.t)  # (t, t, 3) uint8
    out = resized[p.y : p.y + R, p.x : p.x + R]  # (R, R, 3)
    if p.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def dvae_augment(img: np.ndarray, R: int, rng: np.random.Generator) -> np.ndarray:
    """Listing 1: RGB uint8 (H, W, 3) → (R, R, 3) uint8 for dVAE training."""
    _check_rgb(img)
    return apply_params(img, draw_dvae_params(img.shape[0], img.shape[1], R, rng), R)


def prior_augment(img: np.ndarray, R: int, rng: np.random.Generator) -> np.ndarray:
    """Listing 2: RGB uint8 (H, W, 3) → (R, R, 3) uint8 for the prior (no flip)."""
    _check_rgb(img)
    return apply_params(img, draw_prior_params(img.shape[0], img.shape[1], R, rng), R)


def centre_crop_resize(img: np.ndarray, R: int) -> np.ndarray:
    """Centre square crop, area resize to R (bicubic when growing): the deterministic pretokenize view."""
    _check_rgb(img)
    return apply_params(img, centre_params(img.shape[0], img.shape[1], R), R)


def _check_rgb(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {img.dtype} {img.shape}")


AUGMENTS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "dvae": dvae_augment,
    "prior": prior_augment,
}


# --------------------------------------------------------------------------------------------------
# Filters [P App. C]: too-short captions, aspect ratio, pluggable language / boilerplate filters
# --------------------------------------------------------------------------------------------------

CaptionFilter = Callable[[str, dict[str, Any]], "str | None"]


def caption_too_short(caption: str, min_words: int) -> bool:
    return len(caption.split()) < min_words


def aspect_ratio_ok(w: int, h: int, max_ratio: float = 2.0) -> bool:
    """Long side / short side ≤ max_ratio: the paper keeps ratios in [1/2, 2] [P App. C]."""
    return max(w, h) <= max_ratio * min(w, h)


_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
    r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_DATE = (
    rf"(?:\d{{1,4}}[-/.]\d{{1,2}}[-/.]\d{{1,4}}"  # 2012-05-03, 03/05/2012, 3.5.12
    rf"|(?:\d{{1,2}}(?:st|nd|rd|th)?\s+)?{_MONTH}\.?(?:\s+\d{{1,2}}(?:st|nd|rd|th)?)?,?(?:\s+\d{{4}})?"  # May 3, 2012
    rf"|\d{{4}})"  # 2012
)
_BOILERPLATE = re.compile(
    "^(?:"
    # "photographed on <date>" [P App. C], "photo taken on May 3, 2012 at 10:32 by jdoe"
    rf"(?:this\s+)?(?:photo(?:graph)?(?:ed)?|picture|pic|image|taken|shot|uploaded|posted|captured)"
    rf"(?:\s+(?:was\s+)?(?:taken|uploaded|posted|captured|shot))?\s+(?:on|in)\s+{_DATE}"
    r"(?:\s+at\s+[\d:.\s]+(?:[ap]\.?m\.?)?)?(?:\s+by\s+\S+(?:\s+\S+){0,3})?"
    r"|(?:img|dsc|dscn|dscf|pict|imag|photo|p)[\s_-]?\d{3,}(?:\.\w{3,4})?"  # camera file names: IMG_1234.JPG
    r"|\S+\.(?:jpe?g|png|gif|webp|bmp|tiff?)"  # a bare file name
    r"|(?:untitled|no\s+title|image|photo|picture|thumbnail|default)(?:\s+\d+)?"  # placeholder titles
    r"|[\d\W_]+"  # no letters at all
    r")\W*$",
    re.IGNORECASE,
)


def boilerplate_filter(caption: str, meta: dict[str, Any]) -> str | None:
    """Built-in filter: captions that are mostly boilerplate, e.g. "photographed on <date>" [P App. C].

    Returns ``"boilerplate_caption"`` for a caption that is only a date line, a camera file name, a bare file
    name, a placeholder title or no letters at all; else ``None``.
    """
    return "boilerplate_caption" if _BOILERPLATE.match(caption.strip()) else None


def load_filter(spec: str) -> CaptionFilter:
    """Resolve ``"package.module:function"`` (or ``package.module.function``) to the filter callable."""
    spec = spec.strip()
    module, sep, attr = spec.partition(":")
    if not sep:
        module, _, attr = spec.rpartition(".")
    if not module or not attr:
        raise ValueError(f"data.filters entry {spec!r} is not an import path like 'mypkg.filters:english_only'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"data.filters entry {spec!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"data.filters entry {spec!r} is not callable")
    return fn


def parse_filter_specs(specs: str | Sequence[str]) -> list[str]:
    """``"a:f, b:g"`` → ``["a:f", "b:g"]``; empty entries dropped."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    return [s.strip() for s in items if s.strip()]
