"""``dalle-dist data check SHARDS --stage dvae|prior [--resolution R] [--json]``.

Runs the training input pipeline (the same :class:`~.pipeline.ImageProcessor` the trainers use: decode →
filters → Listing 1 or 2 at side R) over every sample of the shards once, in tar order, and counts what is
kept and what is skipped, by reason. Token shards (``dalle-dist pretokenize`` output, recognised by their
``KEY.codes.npy`` members) go through the prior's :class:`~.pipeline.TokenProcessor` instead, with the
byte-level tokenizer and the default prior's caption length.

Output: one JSON object ``{"yielded": N, "skipped": {reason: n, ...}, "counted": {event: n, ...}}``.
``counted`` holds events that keep the sample (``caption_truncated``, ``image_upscaled``). The filter settings
are ``DataConfig``'s defaults. Exit 0 unless no shard could be opened at all (exit 2, with the reason).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from tqdm import tqdm

from ..config import DataConfig, PriorModelConfig
from .pipeline import CODES_EXTENSION, ImageProcessor, TokenProcessor, load_codes
from .shards import ShardError, ShardReader, expand_shards, read_shard
from .text import ByteTokenizer

SHARD_FAILURES = ("unreadable_shard", "corrupt_shard")


def check_shards(
    shards: list[str], stage: str, resolution: int, data: DataConfig | None = None, progress: bool = False
) -> dict[str, Any]:
    """Count kept and skipped samples of ``shards`` under the ``stage``'s pipeline (module docstring)."""
    data = data or DataConfig()
    skipped: Counter = Counter()
    counted: Counter = Counter()
    images = ImageProcessor(stage, resolution, data)
    prior = PriorModelConfig()
    # The codebook size is not in a token shard: accept any uint16 code; the grid comes from the first sample.
    tokens = TokenProcessor(data, ByteTokenizer(), prior.caption_len, _grid_of_first(shards), 2**16)
    yielded = 0
    reader = ShardReader(shards, seed=data.seed, loop=False, skipped=skipped)
    for raw in tqdm(reader, desc="data check", unit="sample", disable=not progress):
        processor = tokens if raw.get(CODES_EXTENSION) is not None else images
        yielded += processor(raw, skipped, counted) is not None
    return {
        "yielded": yielded,
        "skipped": dict(sorted(skipped.items())),
        "counted": dict(sorted(counted.items())),
    }


def _grid_of_first(shards: list[str]) -> int:
    """Token shards carry their grid in the manifest; reading it from the first sample needs no manifest."""
    for path in shards:
        for raw in read_shard(path, Counter()):
            if raw.get(CODES_EXTENSION) is not None:
                try:
                    return int(load_codes(raw[CODES_EXTENSION]).shape[0])
                except (ValueError, OSError, EOFError):
                    continue
            return PriorModelConfig().grid
    return PriorModelConfig().grid


def format_report(report: dict[str, Any], n_shards: int) -> str:
    total = report["yielded"] + sum(v for k, v in report["skipped"].items() if not k.endswith("_shard"))
    lines = [f"{n_shards} shard(s), {total} sample(s): {report['yielded']} yielded"]
    for title, key in (("skipped", "skipped"), ("counted (kept)", "counted")):
        if report[key]:
            lines.append(f"{title}:")
            lines += [f"  {reason:<24} {n}" for reason, n in sorted(report[key].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def cli_check(args: argparse.Namespace) -> int:
    try:
        shards = expand_shards(args.shards)
    except ShardError as err:
        print(f"dalle-dist data check: {err}", file=sys.stderr)
        return 2
    if args.resolution < 1:
        print(f"dalle-dist data check: --resolution must be >= 1, got {args.resolution}", file=sys.stderr)
        return 2
    report = check_shards(shards, args.stage, args.resolution, progress=not args.json and sys.stderr.isatty())
    print(json.dumps(report, sort_keys=True) if args.json else format_report(report, len(shards)))
    failed = sum(report["skipped"].get(k, 0) for k in SHARD_FAILURES)
    if report["yielded"] == 0 and failed == len(shards):
        print(
            f"dalle-dist data check: none of the {len(shards)} shard(s) could be opened as a tar file", file=sys.stderr
        )
        return 2
    return 0
