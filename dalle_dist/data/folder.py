"""A folder of image/caption pairs: ``NAME.{jpg,jpeg,png,webp}`` next to ``NAME.txt``.

The single-process trainers read it; tar shards with the paper's augmentation listings come with the data
pipeline. Images are resized so the short side is ``size`` and centre-cropped, as in openai/DALL-E's usage
notebook [C]. Unreadable images are skipped and counted, never fatal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class FolderPairs:
    """All readable pairs of a folder, decoded once into memory (small folders only)."""

    images: torch.Tensor  # (N, 3, size, size) uint8
    captions: list[str]
    skipped: Counter = field(default_factory=Counter)


def load_image(path: Path, size: int) -> torch.Tensor:
    """Decode any PIL mode to RGB, short side → size (bicubic), centre crop. Returns (3, size, size) uint8."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)  # (size, size, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, size, size)


def read_folder(root: str | Path, size: int) -> FolderPairs:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    images: list[torch.Tensor] = []
    captions: list[str] = []
    skipped: Counter = Counter()
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            skipped["missing_caption"] += 1
            continue
        try:
            caption = txt.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            skipped["caption_not_utf8"] += 1
            continue
        try:
            images.append(load_image(path, size))
        except (UnidentifiedImageError, OSError, ValueError):
            skipped["unreadable_image"] += 1
            continue
        captions.append(caption)
    if not images:
        raise ValueError(
            f"no readable image/caption pairs in {str(root)!r} (skipped: {dict(skipped)}); expected files like "
            f"0001.jpg with 0001.txt beside it"
        )
    return FolderPairs(torch.stack(images), captions, skipped)


class EpochSampler:
    """Deterministic shuffled batches over ``n`` items with a resumable (epoch, position) cursor."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next_indices(self) -> torch.Tensor:
        out: list[torch.Tensor] = []
        need = self.batch_size
        while need:
            order = self._order()
            take = order[self.pos : self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return torch.cat(out)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
