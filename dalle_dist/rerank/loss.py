"""The CLIP loss with duplicate captions masked, extra text-only negatives, and held-out retrieval metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import ContrastiveReranker


def _normalise(caption: str) -> str:
    return " ".join(caption.lower().split())


def same_caption(a: list[str], b: list[str] | None = None) -> Tensor:
    """(len(a), len(b)) bool: caption a[i] equals b[j] after lowercasing and collapsing whitespace (b = a if None)."""
    a_norm = [_normalise(c) for c in a]
    b_norm = a_norm if b is None else [_normalise(c) for c in b]
    ids = {c: i for i, c in enumerate(dict.fromkeys(a_norm + b_norm))}
    ka = torch.tensor([ids[c] for c in a_norm])  # (A,)
    kb = torch.tensor([ids[c] for c in b_norm])  # (B,)
    return ka[:, None] == kb[None, :]  # (A, B)


def clip_loss(
    img: Tensor,
    txt: Tensor,
    scale: Tensor,
    captions: list[str],
    neg_txt: Tensor | None = None,
    neg_captions: list[str] | None = None,
) -> Tensor:
    """Symmetric InfoNCE [CLIP] over unit embeddings img, txt (B, D) of B pairs.

    Duplicates: many synthetic captions repeat verbatim ("a small red circle"). For two pairs with the same
    caption the "negative" text is exactly the positive one, so plain InfoNCE would push an image away from its
    own caption. Such off-diagonal entries are removed from both softmaxes (masked to -inf): equal captions are
    neither positives nor negatives, and each row keeps its own pair as the one target.

    neg_txt (E, D), neg_captions E: text-only hard negatives (captions no image of the batch was paired with);
    they widen the image → text softmax only, masked for any image whose own caption they equal.
    """
    b = len(captions)
    eye = torch.eye(b, dtype=torch.bool, device=img.device)  # (B, B)
    duplicate = same_caption(captions).to(img.device) & ~eye  # (B, B): equal captions of another pair
    logits = (scale * img @ txt.T).masked_fill(duplicate, float("-inf"))  # (B, B): image i vs caption j
    target = torch.arange(b, device=img.device)  # (B,)
    t2i = F.cross_entropy(logits.T, target)  # the mask is symmetric, so the transpose stays valid
    if neg_txt is not None and len(neg_txt):
        clash = same_caption(captions, neg_captions).to(img.device)  # (B, E): the "negative" is my caption
        extra = (scale * img @ neg_txt.T).masked_fill(clash, float("-inf"))  # (B, E)
        logits = torch.cat([logits, extra], dim=1)  # (B, B + E)
    return (F.cross_entropy(logits, target) + t2i) / 2


@torch.no_grad()
def retrieval_metrics(model: ContrastiveReranker, images: Tensor, captions: list[str]) -> dict[str, float]:
    """Held-out metrics on one batch (B images, their B captions).

    - ``top1``: text → image retrieval within the batch; a retrieved image counts as right when its own caption
      equals the query (duplicates are equally good answers). Chance is about 1/B.
    - ``pair_acc``: how often an image scores its own caption above another sample's different caption (every
      such pair counted once); chance is 0.5.
    """
    model.eval()
    img = model.encode_images(model.prepare_images(images))  # (B, D)
    txt = model.encode_texts(model.tokenize(captions))  # (B, D)
    sim = txt @ img.T  # (B, B): caption i vs image j
    same = same_caption(captions).to(sim.device)  # (B, B)
    top1 = same[torch.arange(len(captions)), sim.argmax(1)].float().mean()
    own = sim.diagonal()  # (B,): image i with its caption
    wins = own[:, None] > sim.T  # (B, B): image i prefers its caption over caption j (sim.T[i, j] = image i, cap j)
    pair_acc = wins[~same].float().mean() if (~same).any() else torch.tensor(float("nan"))
    return {"top1": float(top1), "pair_acc": float(pair_acc), "n": float(len(captions))}
