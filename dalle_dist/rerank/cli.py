"""``dalle-dist train-reranker``: argument definitions; the work is in :mod:`dalle_dist.rerank.train`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise SystemExit(f"dalle-dist train-reranker: unrecognized arguments: {' '.join(extra)}")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from .train import train_reranker

    try:
        summary = train_reranker(
            args.shards,
            args.tokenizer,
            args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            holdout_every=args.holdout_every,
            eval_size=args.eval_size,
            mirror=not args.no_mirror,
            swap_negatives=not args.no_swap_negatives,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"dalle-dist train-reranker: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0


def register(sub: Any) -> None:
    """Add ``train-reranker`` to the top-level subparsers of ``dalle-dist``."""
    p = sub.add_parser(
        "train-reranker",
        help="train the small contrastive text-image model that ranks generated samples [P §2.6]",
        description="Train a small CLIP-style model (transformer text encoder, CNN image encoder, symmetric InfoNCE) "
        "on the image-caption shards the dVAE and prior train on. One sample in --holdout-every (by key) is held "
        "out; the summary reports held-out text→image top-1 retrieval and pairwise accuracy. Writes "
        "OUT/reranker.safetensors, OUT/reranker.json and a copy of the tokenizer, which dalle-dist generate "
        "--rerank K --reranker OUT (or dalle-dist export --reranker OUT) uses. Prints one JSON summary.",
        epilog="Example: dalle-dist train-reranker --shards data/shapes --tokenizer tokenizer.json --out runs/reranker "
        "(2,000 shapes images, 400 steps: about a minute on 2 CPU cores). docs/reranking.md has the details.",
    )
    p.add_argument("--shards", required=True, help="shard paths: brace pattern(s), comma-separated, or a directory")
    p.add_argument(
        "--tokenizer",
        help="BPE tokenizer JSON (dalle-dist tokenizer train), copied into OUT; default: the byte tokenizer "
        "(slower and weaker: captions are ~5x longer in bytes)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step before hard negatives (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: torch's choice); 1 is fastest on a machine busy with other jobs",
    )
    p.add_argument("--holdout-every", type=int, default=20, help="hold out one sample in N by key (default 20)")
    p.add_argument("--eval-size", type=int, default=256, help="held-out samples used for the metrics (default 256)")
    p.add_argument("--no-mirror", action="store_true", help="no mirrored copies with left/right swapped")
    p.add_argument("--no-swap-negatives", action="store_true", help="no text negatives with spatial words swapped")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar on stderr")
    p.set_defaults(run=_run)
