"""Robust decoding of one webdataset sample's bytes: image → RGB uint8 (H, W, 3), caption → clean str.

Nothing here raises on bad data. Every function returns either a value or a :class:`Skip` whose ``reason``
is a short stable name; callers count the reasons (``data check`` prints them). The reasons and the choices
behind them are tabulated in docs/data.md:

- image: ``missing_image``, ``empty_file``, ``corrupt_image``, ``truncated_image``, ``decompression_bomb``
  (w·h above a pixel budget, checked from the header before any pixel is decoded), ``image_too_small``;
- caption: ``missing_caption``, ``caption_too_long`` (checked on the raw bytes before decoding, so a 10 MB
  "caption" is never decoded in full), ``caption_not_utf8``, ``empty_caption``.

Mode policy (any PIL mode becomes RGB uint8):

- alpha (RGBA, LA, PA, P with transparency) is composited on **white**: dropping alpha would show whatever
  colour the encoder left under fully transparent pixels (often black or garbage); product shots and logos
  with transparent backgrounds are meant to be seen on a light page;
- 16-bit (``I;16*``) and 32-bit integer (``I``) grayscale are **scaled** by 255/65535 (not clipped: clipping
  turns almost every 16-bit image white). ``I`` is what older Pillow returns for 16-bit PNGs, so it is read as
  16-bit too, values clipped to [0, 65535] first;
- float (``F``) images are read as [0, 1] when every value lies there, else as [0, 255];
- CMYK, YCbCr, LAB, HSV, 1-bit and palette images go through PIL's own conversion;
- EXIF orientation is applied, so the aspect-ratio filter and the crops see the image as it is displayed.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's output formats, in lookup order
CAPTION_EXTENSION = "txt"
JSON_EXTENSION = "json"


@dataclass(frozen=True)
class Skip:
    """A sample left out, with the reason it is counted under."""

    reason: str


@dataclass(frozen=True)
class ImageLimits:
    """What counts as a decodable image: a pixel budget and a minimum short side."""

    max_pixels: int = 0  # w·h above this is a decompression bomb; 0: PIL.Image.MAX_IMAGE_PIXELS
    min_side: int = 1  # short side below this is image_too_small

    @property
    def pixel_budget(self) -> int:
        return self.max_pixels or int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def image_bytes(sample: dict[str, Any]) -> bytes | Skip:
    """The image member of a sample (``KEY.jpg|jpeg|png|webp``), or ``missing_image``."""
    for ext in IMAGE_EXTENSIONS:
        data = sample.get(ext)
        if data is not None:
            return data
    return Skip("missing_image")


def open_image(data: bytes, limits: ImageLimits) -> Image.Image | Skip:
    """Parse the header only (lazy PIL open) and check the pixel budget before any pixel is decoded.

    The minimum side is left to the caller (:func:`too_small`), so that it can check the aspect ratio first.
    """
    if not data:
        return Skip("empty_file")
    try:
        with warnings.catch_warnings():
            # We apply our own pixel budget below; PIL's warning between 1× and 2× its limit is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return Skip("decompression_bomb")
    except UnidentifiedImageError:
        return Skip("corrupt_image")
    except Exception as err:  # any decoder error on a header is bad data, never a crash
        return Skip(_classify(err))
    w, h = im.size
    if w * h > limits.pixel_budget:
        return Skip("decompression_bomb")
    return im


def too_small(w: int, h: int, limits: ImageLimits) -> bool:
    return min(w, h) < limits.min_side


def to_rgb_array(im: Image.Image) -> np.ndarray | Skip:
    """Decode the pixels of an opened image and convert any mode to RGB uint8 (H, W, 3)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
            im = _exif_upright(im)
            return _convert(im)
    except Exception as err:
        return Skip(_classify(err))


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray | Skip:
    """Bytes of any PIL-readable image → RGB uint8 (H, W, 3), or the reason it is skipped."""
    im = open_image(data, limits)
    if isinstance(im, Skip):
        return im
    if too_small(*im.size, limits):
        return Skip("image_too_small")
    return to_rgb_array(im)


def _classify(err: Exception) -> str:
    # PIL reports truncation as OSError("image file is truncated ...") or "Truncated File Read".
    if "truncated" in str(err).lower():
        return "truncated_image"
    if isinstance(err, Image.DecompressionBombError):
        return "decompression_bomb"
    return "corrupt_image"


def _exif_upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # malformed EXIF: keep the pixels as stored
        return im


def _convert(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        x = np.asarray(im, dtype=np.float64)  # (H, W), 0..65535 for 16-bit sources
        g = np.rint(np.clip(x, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)  # scale, not clip, to 8 bits
        return np.repeat(g[:, :, None], 3, axis=2)  # (H, W, 3)
    if mode == "F":
        x = np.asarray(im, dtype=np.float64)  # (H, W)
        x = np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if x.size and x.min() >= 0.0 and x.max() <= 1.0 else 1.0
        g = np.rint(np.clip(x * scale, 0, 255)).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)  # (H, W, 3)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if mode in ("PA", "La"):
        im = im.convert("RGBA" if mode == "PA" else "LA")
    if im.mode in ("RGBA", "LA", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)  # alpha on white (module docstring)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)  # (H, W, 3)


def decode_caption(sample: dict[str, Any], max_chars: int) -> str | Skip:
    """The ``KEY.txt`` member as one line of text: whitespace runs collapsed to single spaces.

    Captions over ``max_chars`` characters are skipped (``caption_too_long``), not truncated: such "captions"
    are page text or junk, not descriptions, and a truncated one would describe the image no better. The byte
    length is checked first (UTF-8 uses at most 4 bytes a character), so huge members are never decoded whole.
    """
    data = sample.get(CAPTION_EXTENSION)
    if data is None:
        return Skip("missing_caption")
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    if len(data) > 4 * max_chars:
        return Skip("caption_too_long")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Skip("caption_not_utf8")
    text = " ".join(text.replace("\x00", " ").split())
    if not text:
        return Skip("empty_caption")
    if len(text) > max_chars:
        return Skip("caption_too_long")
    return text


def decode_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The optional ``KEY.json`` member (img2dataset's metadata); unreadable or absent → ``{}``."""
    data = sample.get(JSON_EXTENSION)
    if not data:
        return {}
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}
