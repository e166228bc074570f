"""Hard negatives from spatial words: captions (and mirrored images) that differ from a true pair by a side.

Random in-batch negatives almost never differ from a positive by a spatial word alone, so a contrastive model
trained only on them learns "left of" ≈ "right of" and "above" ≈ "below": colour and shape separate every pair
already. Measured on the synthetic shapes set (docs/reranking.md), relation captions stay at chance on unseen
images without these negatives.

- :func:`add_mirrored`: a left-right mirrored copy of each image whose caption names a side, with "left" and
  "right" swapped, joins the batch as a new *pair*: it is a positive for its own caption and a hard negative
  for the original. Horizontal only: every shape of the set is left-right symmetric, while a vertical flip
  would turn its apex-up triangles upside down.
- :func:`swapped_captions`: each caption with the words of one axis swapped ("above" ↔ "below", "top" ↔
  "bottom", ...) is a *text-only* negative: it describes no image of the batch's pair, so it only enters the
  image → text softmax. With mirroring on, only the vertical axis needs them (the mirrored pairs already
  contrast left with right), which keeps the text encoder's extra work small.

The swaps are plain English word rules, good for captions like the shapes set's; ``mirror=False`` /
``swap_negatives=False`` in :func:`dalle_dist.rerank.train.train_reranker` switch them off.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_HORIZONTAL = {"left": "right", "right": "left"}
# "under" has no single opposite word in these captions: it maps to "above", which is false wherever it was true.
_VERTICAL = {"above": "below", "below": "above", "under": "above", "top": "bottom", "bottom": "top"}
_VERTICAL.update({"upper": "lower", "lower": "upper"})
_WORDS = {axis: re.compile(rf"\b({'|'.join(table)})\b") for axis, table in (("h", _HORIZONTAL), ("v", _VERTICAL))}


def swap_words(caption: str, axis: str) -> str:
    """Swap the spatial words of one axis ("h": left/right, "v": above/below, top/bottom, ...), whole words only."""
    table = _HORIZONTAL if axis == "h" else _VERTICAL
    return _WORDS[axis].sub(lambda m: table[m.group(1)], caption)


def names_side(caption: str, axis: str = "h") -> bool:
    return _WORDS[axis].search(caption) is not None


def add_mirrored(images: Tensor, captions: list[str]) -> tuple[Tensor, list[str]]:
    """Append a mirrored copy, "left" and "right" swapped in its caption, of every sample that names a side.

    images (B, 3, H, W) → (B + S, 3, H, W), captions B → B + S, where S samples name a side.
    """
    sided = [i for i, c in enumerate(captions) if names_side(c, "h")]
    if not sided:
        return images, captions
    flipped = images[sided].flip(-1)  # (S, 3, H, W): mirrored left-right
    return torch.cat([images, flipped]), captions + [swap_words(captions[i], "h") for i in sided]


def swapped_captions(captions: list[str], axes: tuple[str, ...] = ("h", "v")) -> list[str]:
    """Text-only negatives: one per caption and axis it names, that axis's words swapped; duplicates dropped."""
    out = [swap_words(c, axis) for c in captions for axis in axes if names_side(c, axis)]
    return list(dict.fromkeys(out))
