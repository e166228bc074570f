"""``dalle-dist generate``: captions → image tokens (KV cache) → dVAE decoder → PNG files and a grid.

Reads an export directory (``dalle-dist export``): the prior, the dVAE decoder and, when present, the BPE
tokenizer. Samples at temperature 1 without top-k by default, as the paper does [P §2.6]; ``--prime IMAGE
--prime-rows R`` gives the top R rows of an image's tokens, as in the paper's image-to-image experiments [P §3.3].
``--rerank K`` keeps the best K of the N samples per caption by text-image similarity, as the paper keeps the
best 32 of 512 by CLIP score [P §2.6]; the scorer is ``--reranker DIR`` (``dalle-dist train-reranker``), by
default ``CHECKPOINT/reranker``, or a local open_clip checkpoint (``--clip PATH --clip-arch NAME``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.text import ByteTokenizer, pad_batch
from ..devices import resolve_device
from ..models.dvae import DiscreteVAE
from ..models.prior import DallePrior
from ..rerank.clip import DEFAULT_ARCH
from ..rerank.scorer import Scorer, rank
from ..train.export import RERANKER, TOKENIZER, load_export
from .generate import generate_images


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="export directory (dalle-dist export) with prior and dVAE")
    p.add_argument("--text", action="append", required=True, help="caption (repeatable)")
    p.add_argument("--n", type=int, default=8, help="images per caption (default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="1 as in the paper; 0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    p.add_argument("--prime", help="image whose top rows of tokens are given (image-to-image)")
    p.add_argument("--prime-rows", type=int, default=0, help="token rows taken from --prime (paper: 15 of 32)")
    p.add_argument("--batch-size", type=int, default=16, help="samples decoded at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", required=True, help="output directory for the PNGs and grid.png")
    p.add_argument(
        "--rerank",
        type=int,
        metavar="K",
        help="keep the best K of the --n samples per caption by reranker score [P §2.6]: grid.png shows the K "
        "best in rank order, grid_all.png all N; every PNG is still written and index.json gains score, rank, "
        "selected",
    )
    p.add_argument(
        "--reranker",
        metavar="DIR",
        help=f"reranker directory (dalle-dist train-reranker); default: CHECKPOINT/{RERANKER} (export --reranker)",
    )
    p.add_argument(
        "--clip", metavar="PATH", help="rerank with a local open_clip checkpoint (pip install open_clip_torch)"
    )
    p.add_argument(
        "--clip-arch", default=DEFAULT_ARCH, help=f"open_clip architecture of --clip (default {DEFAULT_ARCH})"
    )


def grid_image(images: np.ndarray, rows: int) -> Image.Image:
    """uint8 images (N, H, W, 3) tiled into ``rows`` rows with a 2-pixel gap."""
    n, h, w, _ = images.shape
    cols = math.ceil(n / rows)
    canvas = np.full((rows * (h + 2) - 2, cols * (w + 2) - 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    return Image.fromarray(canvas)


def _scorer(args: argparse.Namespace, device: torch.device) -> Scorer | None:
    """The reranker for --rerank K (None without it); errors are the user's to fix, so they exit with a message."""
    if args.rerank is None:
        if args.reranker is not None or args.clip is not None:
            raise SystemExit("dalle-dist generate: --reranker / --clip choose the model for --rerank K: add --rerank")
        return None
    if not 1 <= args.rerank <= args.n:
        raise SystemExit(
            f"dalle-dist generate: --rerank K keeps K of the --n {args.n} samples: need 1 <= K <= {args.n}"
        )
    from ..rerank.scorer import load_scorer

    try:
        scorer, _ = load_scorer(reranker=args.reranker, clip=args.clip, clip_arch=args.clip_arch,
                                default_dir=Path(args.checkpoint) / RERANKER, device=device)  # fmt: skip
    except (FileNotFoundError, ImportError, ValueError) as err:
        raise SystemExit(f"dalle-dist generate: {err}") from err
    return scorer


def _tokenizer(checkpoint: str) -> Any:
    """The export's BPE tokenizer when it has one, else the byte tokenizer (either has ``encode(text, len)``)."""
    tok_path = Path(checkpoint) / TOKENIZER
    if tok_path.is_file():
        from ..data.tokenizer import load_tokenizer

        return load_tokenizer(str(tok_path))
    return ByteTokenizer()


def _prime_codes(args: argparse.Namespace, dvae: DiscreteVAE, grid: int, device: torch.device) -> torch.Tensor | None:
    """The top ``--prime-rows`` rows of the ``--prime`` image's dVAE codes, (1, rows·grid); None without --prime."""
    if not args.prime:
        return None
    if not 0 < args.prime_rows <= grid:
        raise SystemExit(f"--prime needs 1 <= --prime-rows <= {grid}")
    from ..data.folder import load_image

    img = load_image(Path(args.prime), dvae.cfg.image_size).float().div(255).unsqueeze(0).to(device)
    return dvae.encode_codes(img).flatten(1)[:, : args.prime_rows * grid]  # (1, rows·grid)


def _sample_caption(
    prior: DallePrior,
    dvae: DiscreteVAE,
    ids: torch.Tensor,
    args: argparse.Namespace,
    prime: torch.Tensor | None,
    gen: torch.Generator,
) -> np.ndarray:
    """``--n`` samples of one caption's ids (1, Lc), in batches of ``--batch-size``: (N, H, W, 3) uint8."""
    cfg = prior.cfg
    images = []
    for start in range(0, args.n, args.batch_size):
        b = min(args.batch_size, args.n - start)
        p = None if prime is None else prime.expand(b, -1)
        codes = generate_images(prior, ids.expand(b, -1), temperature=args.temperature, top_k=args.top_k,
                                prime=p, generator=gen)  # fmt: skip
        with torch.no_grad():
            pix = dvae.decode_codes(codes.view(b, cfg.grid, cfg.grid))  # (b, 3, H, W) in [0, 1]
        images.append((pix.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(images)  # (N, H, W, 3) uint8


def _rerank(batch: np.ndarray, caption: str, entries: list[dict], scorer: Scorer, k: int) -> tuple[np.ndarray, ...]:
    """Score and rank one caption's samples (``entries`` gain score, rank, selected): (best K, all N, best first)."""
    scores = scorer.score(batch, [caption])  # (N,) cosine similarity with the caption
    ranks = rank(scores)  # (N,): 0 = best
    for e, s, r in zip(entries, scores.tolist(), ranks.tolist()):
        e.update(score=round(s, 6), rank=r, selected=r < k)
    order = torch.argsort(ranks).numpy()  # (N,): sample indices, best first
    return batch[order[:k]], batch[order]  # (K, H, W, 3), (N, H, W, 3)


def run(args: argparse.Namespace) -> int:
    if args.n < 1 or args.batch_size < 1 or args.prime_rows < 0:
        raise SystemExit("dalle-dist generate: --n and --batch-size must be >= 1, --prime-rows >= 0")
    device = resolve_device(args.device)
    scorer = _scorer(args, device)  # before sampling: a bad --rerank fails in a second, not after the samples
    prior, dvae, config = load_export(args.checkpoint, device=device)
    if dvae is None:
        raise SystemExit(f"{args.checkpoint} has no dVAE: export with --dvae to decode images")
    cfg = prior.cfg
    tokenizer = _tokenizer(args.checkpoint)
    prime = _prime_codes(args, dvae, cfg.grid, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows, rows_all, index = [], [], []
    for ci, caption in enumerate(args.text):
        ids = pad_batch([tokenizer.encode(caption, cfg.caption_len)], cfg.caption_len).to(device)  # (1, Lc)
        batch = _sample_caption(prior, dvae, ids, args, prime, gen)  # (N, H, W, 3) uint8
        entries = []
        for i, im in enumerate(batch):
            path = out / f"caption{ci:02d}_{i:03d}.png"
            Image.fromarray(im).save(path)
            entries.append({"caption": caption, "file": path.name})
        if scorer is None:
            rows.append(batch)
        else:
            best, ordered = _rerank(batch, caption, entries, scorer, args.rerank)
            rows.append(best)
            rows_all.append(ordered)
        index.extend(entries)
    grid_image(np.concatenate(rows), rows=len(args.text)).save(out / "grid.png")
    summary = {"out": str(out), "images": len(index), "grid": "grid.png", "captions": len(args.text)}
    if scorer is not None:
        grid_image(np.concatenate(rows_all), rows=len(args.text)).save(out / "grid_all.png")
        summary.update(rerank=args.rerank, grid_all="grid_all.png")
    (out / "index.json").write_text(json.dumps(index, indent=2))
    print(json.dumps(summary))
    return 0
