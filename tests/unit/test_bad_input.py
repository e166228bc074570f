"""Every kind of bad input is converted correctly or skipped and counted; ``data check`` reports it.

The real CLI runs once (subprocess) over all the bad shards; the other checks run in process.
"""

import argparse
import io
import json
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _shardmaker import encode, picture, write_tar
from PIL import Image

from dalle_dist.config import DataConfig
from dalle_dist.data.check import check_shards, cli_check
from dalle_dist.data.decode import ImageLimits, Skip, decode_caption, decode_image
from dalle_dist.data.pipeline import ImageProcessor, ShardLoader, collate_images

R = 32  # output side for these tests; min image side defaults to R/2 = 16
GOOD = picture(40, 48, seed=3)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height pixels but carries almost no data (a decompression bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def rgba_image() -> Image.Image:
    arr = np.zeros((40, 40, 4), np.uint8)
    arr[..., :3] = (200, 10, 10)
    arr[:20, :, 3] = 255  # top half opaque red, bottom half fully transparent
    return Image.fromarray(arr, "RGBA")


def sixteen_bit() -> Image.Image:
    g = (np.arange(40 * 40).reshape(40, 40) % 256 * 257).astype(np.uint16)  # 8-bit value k stored as k·257
    return Image.fromarray(g)  # mode I;16


def jpeg_truncated() -> bytes:
    noisy = np.random.default_rng(0).integers(0, 256, (120, 120, 3)).astype(np.uint8)
    data = encode(noisy, "JPEG")
    return data[: len(data) // 2]


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise for display
    return encode(picture(20, 36), "JPEG", exif=exif)


# (name, members, expected reason or None when the sample must be converted and kept)
CASES = [
    ("rgb_jpg", {"jpg": encode(GOOD, "JPEG")}, None),
    ("rgb_webp", {"webp": encode(GOOD, "WEBP")}, None),
    ("gray_L", {"png": encode(Image.fromarray(GOOD).convert("L"))}, None),
    ("gray_alpha_LA", {"png": encode(Image.fromarray(GOOD).convert("LA"))}, None),
    ("cmyk", {"jpg": encode(Image.fromarray(GOOD).convert("CMYK"), "JPEG")}, None),
    ("rgba", {"png": encode(rgba_image())}, None),
    ("palette_P", {"png": encode(Image.fromarray(GOOD).convert("P", palette=Image.ADAPTIVE))}, None),
    ("palette_transparent", {"png": encode(Image.fromarray(GOOD).convert("P"), transparency=0)}, None),
    ("sixteen_bit", {"png": encode(sixteen_bit())}, None),
    ("int32_I", {"png": encode(Image.fromarray(GOOD[..., 0].astype(np.int32) * 257), "TIFF")}, None),
    ("float_F", {"png": encode(Image.fromarray(GOOD[..., 0].astype(np.float32) / 255), "TIFF")}, None),
    ("bilevel_1", {"png": encode(Image.fromarray(GOOD).convert("1"))}, None),
    ("exif_rotated", {"jpg": exif_rotated()}, None),
    ("small_upscaled", {"png": encode(picture(20, 24))}, None),
    ("corrupt", {"jpg": b"this is not an image at all" * 10}, "corrupt_image"),
    ("truncated", {"jpg": jpeg_truncated()}, "truncated_image"),
    ("zero_byte", {"jpg": b""}, "empty_file"),
    ("bomb", {"png": png_header_only(60_000, 60_000)}, "decompression_bomb"),
    ("one_by_one", {"png": encode(picture(1, 1))}, "image_too_small"),
    ("one_by_10000", {"png": encode(picture(1, 10_000))}, "aspect_ratio"),
    ("too_wide", {"png": encode(picture(40, 81))}, "aspect_ratio"),
    ("no_image", {}, "missing_image"),
    ("no_caption", {"png": encode(GOOD), "txt": None}, "missing_caption"),
    ("latin1_caption", {"png": encode(GOOD), "txt": "café au lait sur la table".encode("latin-1")}, "caption_not_utf8"),
    ("empty_caption", {"png": encode(GOOD), "txt": b"  \n\t "}, "empty_caption"),
    ("ten_mb_caption", {"png": encode(GOOD), "txt": b"word " * 2_000_000}, "caption_too_long"),
    ("short_caption", {"png": encode(GOOD), "txt": b"dog"}, "caption_too_short"),
    ("boilerplate", {"png": encode(GOOD), "txt": b"photographed on 2012-05-03"}, "boilerplate_caption"),
]


def build_samples() -> list[dict]:
    samples = []
    for i, (name, members, _) in enumerate(CASES):
        sample = {"__key__": f"{i:03d}_{name}", "txt": f"a test image called {name}".encode(), "json": "{}"}
        sample.update(members)
        samples.append({k: v for k, v in sample.items() if v is not None})
    return samples


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    write_tar(root / "bad.tar", build_samples())
    good = [{"__key__": f"t{i}", "png": encode(picture(40, 40, i)), "txt": f"good sample {i}"} for i in range(6)]
    full = Path(write_tar(root / "whole.tar", good)).read_bytes()
    (root / "truncated.tar").write_bytes(full[: int(len(full) * 0.6)])
    (root / "empty.tar").write_bytes(b"")
    (root / "garbage.tar").write_bytes(b"\x00\x01garbage" * 300)
    return {k: str(root / f"{k}.tar") for k in ("bad", "whole", "truncated", "empty", "garbage")}


def test_each_bad_sample_is_counted_by_its_reason(bad_shards):
    report = check_shards([bad_shards["bad"]], "dvae", R)
    expected = Counter(reason for _, _, reason in CASES if reason)
    assert report["skipped"] == dict(expected)
    assert report["yielded"] == sum(reason is None for _, _, reason in CASES)
    assert report["counted"] == {"image_upscaled": 2}  # small_upscaled (20 px) and exif_rotated (20 px) < R


def test_truncated_and_unreadable_shards_are_counted_not_fatal(bad_shards):
    report = check_shards([bad_shards[k] for k in ("truncated", "empty", "garbage")], "prior", R)
    assert report["skipped"] == {"truncated_shard": 1, "corrupt_shard": 2}
    assert 1 <= report["yielded"] < 6  # the samples before the cut survive


def test_data_check_cli_json(bad_shards):
    spec = ",".join(bad_shards[k] for k in ("bad", "truncated", "empty", "garbage"))
    cmd = [sys.executable, "-m", "dalle_dist", "data", "check", spec, "--stage", "dvae", "--resolution", str(R)]
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report == check_shards(spec.split(","), "dvae", R)
    assert set(report) >= {"yielded", "skipped"} and report["skipped"]["caption_not_utf8"] == 1


def _args(shards: str, json_out: bool = True) -> argparse.Namespace:
    return argparse.Namespace(shards=shards, stage="dvae", resolution=R, json=json_out)


def test_data_check_exit_codes(bad_shards, capsys):
    assert cli_check(_args(f"{bad_shards['empty']},{bad_shards['garbage']}")) == 2  # nothing could be opened
    assert "could be opened" in capsys.readouterr().err
    assert cli_check(_args(bad_shards["bad"] + ".missing")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_check(_args(bad_shards["whole"], json_out=False)) == 0
    assert "6 yielded" in capsys.readouterr().out


def test_training_stream_never_crashes_on_bad_data(bad_shards):
    shards = [bad_shards[k] for k in ("bad", "truncated", "garbage")]
    loader = ShardLoader(shards, ImageProcessor("dvae", R, DataConfig()), collate_images, 4, shuffle=5)
    keep = {f"{i:03d}_{name}" for i, (name, _, reason) in enumerate(CASES) if reason is None}
    keys = [k for _ in range(12) for k in loader.next_batch()["keys"]]  # several epochs
    assert set(keys) <= keep | {f"t{i}" for i in range(6)}
    assert loader.skipped["corrupt_shard"] >= 2 and loader.skipped["truncated_shard"] >= 2


# --------------------------------------------------------------------------------------------------
# Conversions are correct, not just non-crashing
# --------------------------------------------------------------------------------------------------


def test_sixteen_bit_is_scaled_not_clipped():
    arr = decode_image(encode(sixteen_bit()))
    expected = np.arange(40 * 40).reshape(40, 40) % 256
    assert arr.dtype == np.uint8 and arr.shape == (40, 40, 3)
    np.testing.assert_array_equal(arr[..., 0], expected)
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_alpha_is_composited_on_white():
    arr = decode_image(encode(rgba_image()))
    assert (arr[:20] == (200, 10, 10)).all() and (arr[20:] == 255).all()
    half = np.zeros((20, 20, 4), np.uint8)
    half[...] = (0, 0, 0, 128)
    mid = decode_image(encode(Image.fromarray(half, "RGBA")))
    assert (np.abs(mid.astype(int) - 127) <= 1).all()
    la = decode_image(encode(Image.fromarray(np.zeros((20, 20, 2), np.uint8), "LA")))
    assert (la == 255).all()
    pal = Image.fromarray(np.zeros((20, 20), np.uint8), "P")
    pal.putpalette([10, 20, 30] * 256)
    assert (decode_image(encode(pal, transparency=0)) == 255).all()
    assert (decode_image(encode(pal)) == (10, 20, 30)).all()


def test_other_modes_convert_to_rgb():
    cmyk = decode_image(encode(Image.fromarray(GOOD).convert("CMYK"), "JPEG"))
    assert cmyk.shape == (40, 48, 3) and np.abs(cmyk.astype(int) - GOOD).mean() < 20
    f = decode_image(encode(Image.fromarray(GOOD[..., 1].astype(np.float32) / 255), "TIFF"))
    np.testing.assert_array_equal(f[..., 0], GOOD[..., 1])
    i32 = decode_image(encode(Image.fromarray(GOOD[..., 2].astype(np.int32) * 257), "TIFF"))
    np.testing.assert_array_equal(i32[..., 0], GOOD[..., 2])
    bw = decode_image(encode(Image.fromarray(GOOD).convert("1")))
    assert set(np.unique(bw)) <= {0, 255}
    rotated = decode_image(exif_rotated())
    assert rotated.shape == (36, 20, 3)  # displayed upright: EXIF orientation applied


def test_limits_and_captions():
    assert decode_image(encode(picture(30, 30)), ImageLimits(max_pixels=899)) == Skip("decompression_bomb")
    assert decode_image(encode(picture(30, 30)), ImageLimits(min_side=31)) == Skip("image_too_small")
    assert decode_caption({"txt": b"  a  red\n\tsquare \x00"}, 100) == "a red square"
    assert decode_caption({"txt": "x" * 101}, 100) == Skip("caption_too_long")
    assert decode_caption({"txt": b"\xff\xfe"}, 100) == Skip("caption_not_utf8")
    assert decode_caption({}, 100) == Skip("missing_caption")


def test_exif_bytes_are_valid_jpeg():
    with Image.open(io.BytesIO(exif_rotated())) as im:
        assert im.getexif()[0x0112] == 6
