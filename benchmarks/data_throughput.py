"""Data pipeline throughput for one worker: raw PIL decode vs decode + filters + Listing 1/2 augmentation.

    .venv/bin/python benchmarks/data_throughput.py                 # builds 200 JPEGs of 400-600 px, R = 256
    .venv/bin/python benchmarks/data_throughput.py --shards 'data/{000000..000009}.tar' --n 2000

Prints one JSON object. ``raw_decode_images_per_s`` is ``Image.open(...).convert("RGB")`` into a numpy array;
``pipeline_images_per_s`` runs the training ``ImageProcessor`` (caption decode, filters, header checks, pixel
decode, the listing's crop / area resize / crop / flip) on the same in-memory samples; ``ratio`` =
pipeline / raw (1.0 would mean augmentation is free). These rates are medians over chunks of 20 images, the
three measurements interleaved chunk by chunk (``--repeats`` passes), so that load from other processes on a
shared CPU affects them alike. ``loader_images_per_s`` adds reading the tar from disk and batching
(``ShardLoader``, ``num_workers=0``; median over batches of 16). One process, one thread: multiply by loader
workers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dalle_dist.config import DataConfig
from dalle_dist.data.decode import Skip, image_bytes
from dalle_dist.data.pipeline import ImageProcessor, ShardLoader, collate_images
from dalle_dist.data.shards import ShardReader, expand_shards


def procedural_jpeg(rng: np.random.Generator, lo: int, hi: int) -> bytes:
    """A photo-like JPEG (smooth gradients, blobs, sensor noise) of random size in [lo, hi] px, quality 90."""
    h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fy, fx, ph = rng.uniform(0.002, 0.03, 2).tolist() + [float(rng.uniform(0, 6.3))]
        img[..., c] = 128 + 90 * np.sin(fy * yy + ph) * np.cos(fx * xx)
    for _ in range(6):  # soft blobs of random colour
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 120)
        mask = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - mask) + rng.uniform(0, 255, 3).astype(np.float32) * mask
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_shards(out: str, n: int, lo: int, hi: int, per_shard: int = 100) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(0, n, per_shard):
        path = os.path.join(out, f"{s // per_shard:06d}.tar")
        with wds.TarWriter(path) as sink:
            for i in range(s, min(n, s + per_shard)):
                sink.write({"__key__": f"{i:08d}", "jpg": procedural_jpeg(rng, lo, hi), "txt": f"a photo number {i}"})
        paths.append(path)
    return paths


def rates(fns: dict[str, Callable[[dict], Any]], samples: list[dict], repeats: int, chunk: int = 20) -> dict:
    """Images per second of each function: the median over chunks of ``chunk`` samples, the functions
    interleaved chunk by chunk, so that load from other processes on a shared CPU hits them all alike."""
    for fn in fns.values():  # warm up imports and caches
        for s in samples[:3]:
            fn(s)
    per_chunk: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for i in range(0, len(samples), chunk):
            part = samples[i : i + chunk]
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for s in part:
                    fn(s)
                per_chunk[name].append(len(part) / (time.perf_counter() - t0))
    return {name: float(np.median(r)) for name, r in per_chunk.items()}


def raw_decode(sample: dict) -> np.ndarray:
    with Image.open(io.BytesIO(image_bytes(sample))) as im:
        return np.asarray(im.convert("RGB"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="existing image shards (default: build JPEG shards in a temp dir)")
    p.add_argument("--n", type=int, default=200, help="images to build / to read (default 200)")
    p.add_argument("--min-side", type=int, default=400, help="built images: smallest side (default 400)")
    p.add_argument("--max-side", type=int, default=600, help="built images: largest side (default 600)")
    p.add_argument("--resolution", type=int, default=256, help="output side R (default 256)")
    p.add_argument("--repeats", type=int, default=2, help="passes over the samples (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = expand_shards(args.shards) if args.shards else build_shards(tmp, args.n, args.min_side, args.max_side)
        samples = list(islice(ShardReader(paths, loop=False), args.n))
        samples = [s for s in samples if not isinstance(image_bytes(s), Skip)]
        if not samples:
            print(json.dumps({"error": "no samples with an image"}))
            return 1
        data = DataConfig(min_caption_words=0)
        procs = {stage: ImageProcessor(stage, args.resolution, data) for stage in ("dvae", "prior")}
        fns = {"raw": raw_decode, **{k: (lambda s, p=p: p(s, Counter(), Counter())) for k, p in procs.items()}}
        measured = rates(fns, samples, args.repeats)
        raw = measured.pop("raw")
        pipeline, loader = measured, {}
        for stage, proc in procs.items():
            shard_loader = ShardLoader(paths, proc, collate_images, 16, shuffle=0, num_workers=0)
            shard_loader.next_batch()  # the first batch opens the tar; measure the steady state after it
            per_batch = []
            for _ in range(max(1, args.repeats * len(samples) // 16 - 1)):
                t0 = time.perf_counter()
                shard_loader.next_batch()
                per_batch.append(16 / (time.perf_counter() - t0))
            loader[stage] = float(np.median(per_batch))
        sizes = [raw_decode(s).shape[:2] for s in samples[:50]]
        report = {
            "n_images": len(samples),
            "resolution": args.resolution,
            "mean_source_side": round(float(np.mean(sizes)), 1),
            "mean_jpeg_kb": round(float(np.mean([len(image_bytes(s)) for s in samples])) / 1024, 1),
            "raw_decode_images_per_s": round(raw, 1),
            "pipeline_images_per_s": {k: round(v, 1) for k, v in pipeline.items()},
            "ratio": {k: round(v / raw, 3) for k, v in pipeline.items()},
            "loader_images_per_s": {k: round(v, 1) for k, v in loader.items()},
            "threads": 1,
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
