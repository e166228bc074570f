"""The paper's augmentation listings (crop and scale statistics, flips, determinism), area resize, filters."""

import math
from collections import Counter

import numpy as np
import pytest

from dalle_dist.config import DataConfig
from dalle_dist.data.preprocess import (
    AugmentParams,
    apply_params,
    area_resize,
    aspect_ratio_ok,
    boilerplate_filter,
    caption_too_short,
    centre_crop_resize,
    draw_dvae_params,
    draw_prior_params,
    dvae_augment,
    load_filter,
    prior_augment,
    resize_square,
)

N_DRAWS = 4000


def tf_resize_area_align_corners(img: np.ndarray, t: int) -> np.ndarray:
    """A literal transliteration of TF's ResizeAreaOp loop (align_corners=True): the reference."""
    s = img.shape[0]
    sc = (s - 1) / (t - 1) if t > 1 else s / t

    def taps(y):
        a, b = y * sc, (y + 1) * sc
        out = []
        for i in range(math.floor(a), math.ceil(b)):
            if i < a:
                w = sc if i + 1 > b else i + 1 - a
            else:
                w = b - i if i + 1 > b else 1.0
            out.append((min(i, s - 1), w))  # BoundIfNeeded
        return out

    res = np.zeros((t, t, img.shape[2]))
    for y in range(t):
        for x in range(t):
            res[y, x] = sum(img[iy, ix] * wy * wx for iy, wy in taps(y) for ix, wx in taps(x)) / (sc * sc)
    return res


@pytest.mark.parametrize("s,t", [(10, 7), (13, 5), (9, 9), (20, 3), (7, 1), (37, 12), (30, 29)])
def test_area_resize_matches_tf_area_align_corners(s, t):
    img = np.random.default_rng(s * 100 + t).integers(0, 256, (s, s, 3)).astype(np.uint8)
    np.testing.assert_allclose(area_resize(img, t), tf_resize_area_align_corners(img.astype(np.float64), t), atol=1e-3)


def test_resize_square_is_rint_and_clip_of_area_and_keeps_constants():
    img = np.random.default_rng(0).integers(0, 256, (50, 50, 3)).astype(np.uint8)
    out = resize_square(img, 33)
    assert out.dtype == np.uint8 and out.shape == (33, 33, 3)
    np.testing.assert_array_equal(out, np.clip(np.rint(area_resize(img, 33)), 0, 255).astype(np.uint8))
    flat = np.full((41, 41, 3), 200, np.uint8)
    assert (resize_square(flat, 17) == 200).all() and (resize_square(flat, 64) == 200).all()
    grown = resize_square(img[:20, :20], 32)  # bicubic when growing (s < R)
    assert grown.shape == (32, 32, 3) and grown.dtype == np.uint8


def _draws(fn, h, w, R, seed=0):
    rng = np.random.default_rng(seed)
    return [fn(h, w, R, rng) for _ in range(N_DRAWS)]


def _assert_uniform(values, lo, hi):
    """Every integer of [lo, hi] drawn, none outside, counts within 5 binomial sigmas of uniform."""
    counts = Counter(values)
    assert set(counts) == set(range(lo, hi + 1)), (sorted(counts), lo, hi)
    p = 1 / (hi - lo + 1)
    sigma = math.sqrt(N_DRAWS * p * (1 - p))
    assert all(abs(c - N_DRAWS * p) < 5 * sigma + 1 for c in counts.values()), counts


@pytest.mark.parametrize("h,w,R", [(300, 500, 64), (520, 260, 256), (80, 100, 64)])
def test_listing1_crop_scale_and_flip_statistics(h, w, R):
    ps = _draws(draw_dvae_params, h, w, R)
    s = min(h, w)
    assert all(p.s == s for p in ps)
    # Random square crop of side s: offsets uniform over [0, h - s] × [0, w - s].
    if h > s:
        _assert_uniform([p.top for p in ps], 0, h - s)
    if w > s:
        _assert_uniform([p.left for p in ps], 0, w - s)
    assert all(p.top == 0 for p in ps) if h == s else all(p.left == 0 for p in ps)
    # t ~ U{min(s, round(9R/8)) … min(s, round(12R/8))}.
    _assert_uniform([p.t for p in ps], min(s, round(9 / 8 * R)), min(s, round(12 / 8 * R)))
    # Final random crop of R inside t×t, and a fair horizontal flip.
    assert all(0 <= p.y <= p.t - R and 0 <= p.x <= p.t - R for p in ps)
    t_top = max(p.t for p in ps)
    assert {p.y for p in ps if p.t == t_top} >= {0, t_top - R}
    flips = sum(p.flip for p in ps) / N_DRAWS
    assert abs(flips - 0.5) < 5 * math.sqrt(0.25 / N_DRAWS), flips


@pytest.mark.parametrize("h,w,R", [(300, 500, 64), (520, 260, 256), (270, 270, 256)])
def test_listing2_near_centre_crop_scale_and_no_flip(h, w, R):
    ps = _draws(draw_prior_params, h, w, R)
    s = min(h, w)
    for side, offsets in ((h, [p.top for p in ps]), (w, [p.left for p in ps])):
        d = side - s
        lo, hi_excl = 3 * d // 8, max(3 * d // 8 + 1, 5 * d // 8)
        _assert_uniform(offsets, lo, hi_excl - 1)  # [3(h−s)/8, max(3(h−s)/8+1, 5(h−s)/8))
    _assert_uniform([p.t for p in ps], R, min(s, round(9 / 8 * R)))  # t ~ U{R … min(s, round(9R/8))}
    assert all(0 <= p.y <= p.t - R and 0 <= p.x <= p.t - R for p in ps)
    assert not any(p.flip for p in ps)  # "the image may contain text" [P B.2]


def test_images_smaller_than_R_are_upscaled_to_R():
    for fn in (draw_dvae_params, draw_prior_params):
        for p in _draws(fn, 40, 50, 64)[:50]:
            assert p.s == 40 and p.t == 64 and p.y == p.x == 0


def test_apply_params_crops_where_the_parameters_say():
    h, w, R = 30, 40, 12
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy, xx, (yy + xx) % 256], axis=2).astype(np.uint8)  # pixel value = its coordinates
    p = AugmentParams(top=3, left=7, s=20, t=20, y=2, x=5, flip=False)  # t = s: no resampling
    out = apply_params(img, p, R)
    np.testing.assert_array_equal(out, img[5:17, 12:24])
    flipped = apply_params(img, AugmentParams(3, 7, 20, 20, 2, 5, True), R)
    np.testing.assert_array_equal(flipped, img[5:17, 12:24][:, ::-1])


@pytest.mark.parametrize("fn", [dvae_augment, prior_augment])
@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (64, 64), (40, 70), (257, 1000)])
def test_augment_output_shape_dtype_and_determinism(fn, shape):
    img = np.random.default_rng(1).integers(0, 256, (*shape, 3)).astype(np.uint8)
    a = fn(img, 64, np.random.default_rng(7))
    b = fn(img, 64, np.random.default_rng(7))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and a.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(a, b)
    if shape == (300, 400):
        assert any(not np.array_equal(a, fn(img, 64, np.random.default_rng(k))) for k in range(8, 12))
    with pytest.raises(ValueError, match="RGB uint8"):
        fn(img.astype(np.float32), 64, np.random.default_rng(0))


def test_centre_crop_resize_is_deterministic_centre():
    img = np.random.default_rng(2).integers(0, 256, (60, 100, 3)).astype(np.uint8)
    out = centre_crop_resize(img, 60)
    np.testing.assert_array_equal(out, img[:, 20:80])


def test_caption_and_aspect_filters():
    assert caption_too_short("cat", 2) and not caption_too_short("a cat", 2) and not caption_too_short("", 0)
    assert aspect_ratio_ok(200, 100) and aspect_ratio_ok(100, 200) and aspect_ratio_ok(100, 100)
    assert not aspect_ratio_ok(201, 100) and not aspect_ratio_ok(1, 10_000)


@pytest.mark.parametrize(
    "caption,boiler",
    [
        ("photographed on 2012-05-03", True),
        ("Photo taken on May 3, 2012", True),
        ("uploaded on 3 May 2012 at 10:32", True),
        ("IMG_1234.JPG", True),
        ("untitled", True),
        ("2011 !!", True),
        ("photo on the beach at sunset", False),
        ("a photo taken on may day", False),
        ("a red circle at the top left", False),
    ],
)
def test_boilerplate_filter(caption, boiler):
    assert (boilerplate_filter(caption, {}) == "boilerplate_caption") is boiler


def test_filter_plugins_load_by_import_path():
    assert load_filter("dalle_dist.data.preprocess:boilerplate_filter") is boilerplate_filter
    assert load_filter("dalle_dist.data.preprocess.boilerplate_filter") is boilerplate_filter
    with pytest.raises(ValueError, match="cannot be imported"):
        load_filter("no_such_pkg.filters:english_only")
    with pytest.raises(ValueError, match="import path"):
        load_filter("english_only")


def test_plugin_filter_runs_in_the_pipeline():
    from _shardmaker import encode, picture

    from dalle_dist.data.pipeline import ImageProcessor

    data = DataConfig(filters="_shardmaker:no_cats, dalle_dist.data.preprocess:boilerplate_filter")
    proc = ImageProcessor("prior", 32, data)
    skipped, counted = Counter(), Counter()
    png = encode(picture(40, 40))
    for cap in ("a grey cat sleeping", "photographed on 2012-05-03", "a red square"):
        proc({"__key__": "k", "png": png, "txt": cap.encode()}, skipped, counted)
    assert skipped == {"mentions_cats": 1, "boilerplate_caption": 1}
