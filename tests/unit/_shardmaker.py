"""Test data made on the fly: procedural images and webdataset tar shards in img2dataset's layout."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: a colour gradient with one rectangle, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    img = (c0[None, None] * (yy[..., None] / max(h - 1, 1)) + c1[None, None] * (xx[..., None] / max(w - 1, 1))) / 2
    y0, x0 = int(rng.integers(0, max(h // 2, 1))), int(rng.integers(0, max(w // 2, 1)))
    img[y0 : y0 + max(h // 3, 1), x0 : x0 + max(w // 3, 1)] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def encode(arr: np.ndarray | Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, Any]]) -> str:
    """Write samples (``__key__`` plus extension → bytes or str) with webdataset's TarWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def key_of(shard: int, i: int) -> str:
    return f"s{shard:03d}i{i:04d}"


def make_image_shards(
    root: Path, n_shards: int, per_shard: int | list[int], h: int = 40, w: int = 48, fmt: str = "png"
) -> list[str]:
    """n_shards shards of distinct captioned images; ``per_shard`` may differ per shard (uneven shards)."""
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * n_shards
    paths = []
    for s in range(n_shards):
        samples = [
            {
                "__key__": key_of(s, i),
                fmt: encode(picture(h, w, seed=1000 * s + i), "JPEG" if fmt == "jpg" else fmt.upper()),
                "txt": f"a picture number {i} from shard {s}",
                "json": f'{{"width": {w}, "height": {h}}}',
            }
            for i in range(counts[s])
        ]
        paths.append(write_tar(root / f"{s:06d}.tar", samples))
    return paths


def no_cats(caption: str, meta: dict[str, Any]) -> str | None:
    """A plugin filter for tests: loaded by its import path ``_shardmaker:no_cats``."""
    return "mentions_cats" if "cat" in caption.split() else None


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small models on a shared CPU: one intra-op thread is many times faster than two busy-waiting ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
