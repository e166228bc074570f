"""Tiny pretokenized shards in the format ``dalle-dist pretokenize`` writes (docs/data.md: ``KEY.codes.npy``
uint16 (grid, grid), ``KEY.txt``, ``KEY.json``), made directly: no images, no dVAE, a few milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds

from dalle_dist.data.pretokenize import codes_bytes

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "above", "below", "left", "of", "small", "large"]


def key_of(shard: int, i: int) -> str:
    return f"s{shard:02d}_{i:03d}"


def write_token_shards(root: Path, n_shards: int = 4, per_shard: int = 10, grid: int = 8, vocab: int = 512) -> str:
    """``n_shards`` tars of ``per_shard`` samples with random codes and 3-8 word captions; returns the directory."""
    rng = np.random.default_rng(1234)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"p000-{s:06d}.tar")) as tar:
            for i in range(per_shard):
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
                codes = rng.integers(0, vocab, size=(grid, grid)).astype(np.uint16)
                meta = {"grid": grid, "vocab_size": vocab, "source_key": key_of(s, i)}
                tar.write({"__key__": key_of(s, i), "codes.npy": codes_bytes(codes), "txt": caption,
                           "json": json.dumps(meta)})  # fmt: skip
    return str(root)
