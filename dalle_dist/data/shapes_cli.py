"""The synthetic captioned-shapes set, part 3: writing it as webdataset shards, judging shards, and the
``dalle-dist data shapes`` / ``data judge`` commands. :mod:`.shapes` re-exports every public name.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from typing import Any

import numpy as np

from .shapes_judge import JudgeTally, judge_image
from .shapes_scene import (
    _PAIR_TEMPLATES,
    _SINGLE_TEMPLATES,
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    TWO_OBJECT_FRACTION,
    VERSION,
    generate_sample,
    heldout_pairs,
)


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

    tally = JudgeTally()
    for sample in wds.tarfile_samples([{"url": u} for u in urls], handler=wds.warn_and_continue):
        data = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        try:
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # type: ignore[arg-type]
            checks = judge_image(img, sample["txt"].decode("utf-8"))
        except Exception:  # a missing image/caption or an unparseable caption: counted, not fatal
            tally.errors += 1
            continue
        tally.add(checks)
    return tally.summary(digits=5)


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
