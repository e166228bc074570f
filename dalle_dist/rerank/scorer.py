"""Pick the model that ranks samples for ``dalle-dist generate --rerank K``, and rank with it [P §2.6]."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .clip import DEFAULT_ARCH


class Scorer(Protocol):
    """Anything that scores uint8 images (N, 3, H, W) or (N, H, W, 3) against 1 or N captions → (N,)."""

    def score(self, images: Tensor | np.ndarray, captions: list[str]) -> Tensor: ...


def load_scorer(
    *,
    reranker: str | Path | None = None,
    clip: str | Path | None = None,
    clip_arch: str = DEFAULT_ARCH,
    default_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Scorer, str]:
    """(scorer, a one-line description): --clip, else --reranker, else ``default_dir`` when it exists.

    Raises ValueError for both --clip and --reranker, FileNotFoundError when no reranker can be found.
    """
    if clip is not None and reranker is not None:
        raise ValueError("give --reranker DIR or --clip PATH, not both")
    if clip is not None:
        from .clip import load_open_clip

        return load_open_clip(clip, clip_arch, device), f"open_clip {clip_arch} {clip}"
    if reranker is None and default_dir is not None and Path(default_dir).is_dir():
        reranker = default_dir
    if reranker is None:
        raise FileNotFoundError(
            f"--rerank needs a reranker and {str(default_dir)!r} does not exist: pass --reranker DIR (from dalle-dist "
            "train-reranker), or --clip PATH (a local open_clip checkpoint), or export with --reranker DIR"
        )
    from .train import load_reranker

    model, _ = load_reranker(reranker, device)
    return model, f"reranker {reranker}"


def rank(scores: Tensor) -> Tensor:
    """Ranks (N,) long: 0 for the highest score; ties keep sample order."""
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,): best first
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order))
    return ranks
