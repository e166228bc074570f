"""Random batches for smoke runs and tests: no files, a pure function of (seed, step).

dVAE images are a flat background with one axis-aligned rectangle of another colour, so a short run has
structure to learn; prior batches are uniform random caption and image tokens.
"""

from __future__ import annotations

import torch


def _gen(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def random_images(batch: int, size: int, seed: int, step: int) -> torch.Tensor:
    """(B, 3, size, size) uint8: a background colour and one rectangle per image."""
    g = _gen(seed, step)
    colours = torch.randint(0, 256, (batch, 2, 3), generator=g, dtype=torch.uint8)  # (B, 2, 3)
    img = colours[:, 0, :, None, None].expand(batch, 3, size, size).clone()  # (B, 3, S, S)
    corners = torch.randint(0, size, (batch, 4), generator=g)
    for i in range(batch):
        y0, y1 = sorted(corners[i, :2].tolist())
        x0, x1 = sorted(corners[i, 2:].tolist())
        img[i, :, y0 : y1 + 1, x0 : x1 + 1] = colours[i, 1, :, None, None]
    return img


def random_tokens(
    batch: int, caption_len: int, text_vocab: int, image_len: int, image_vocab: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions (B, caption_len) with random lengths ≥ 1 (0 = pad) and image tokens (B, image_len)."""
    g = _gen(seed, step)
    text = torch.randint(1, text_vocab, (batch, caption_len), generator=g)  # (B, Lc)
    lengths = torch.randint(1, caption_len + 1, (batch, 1), generator=g)  # (B, 1)
    text = text.masked_fill(torch.arange(caption_len)[None, :] >= lengths, 0)
    image = torch.randint(0, image_vocab, (batch, image_len), generator=g)  # (B, N)
    return text, image
