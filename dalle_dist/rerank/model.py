"""A small contrastive text-image model that ranks generated samples against their caption [P §2.6].

The paper draws 512 samples per caption and keeps the best 32 by CLIP score [P §2.6]. CLIP is far larger than
anything that trains on a CPU, so this is a miniature of it, sized for the synthetic shapes set (and 64 px
images in general):

- **Text**: token ids (pad id 0) → embedding + learned positions → a 2-layer pre-norm transformer → mean over the
  non-pad tokens. Attention mixes word order into every token before the mean, so "a red circle left of a blue
  square" and "a blue square left of a red circle" still differ.
- **Image**: uint8 → [0, 1], two coordinate channels appended, a 4×4 patchify conv and strided 3×3 conv blocks
  down to a 4×4 map that is *flattened*, not averaged: captions name positions ("top left", "left of"), and a
  global average pool would throw away where things are.
- **Shared space**: linear projections, L2 normalisation, and CLIP's learned logit scale (initial temperature
  0.07, scale capped at 100).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP caps the scale at 100 to keep the softmax from collapsing


class CaptionTokenizer(Protocol):
    """What the text encoder needs: the byte stand-in or the BPE tokenizer (pad id 0, never produced)."""

    vocab_size: int

    def encode(self, caption: str, max_len: int) -> list[int]: ...


@dataclass
class RerankerConfig:
    image_size: int = 64  # side the image encoder sees; other sizes are resized to it
    text_len: int = 32  # caption tokens kept (BPE: ~15 for shapes captions; bytes need ~96)
    vocab_size: int = 257  # ByteTokenizer's; set from the tokenizer when training
    width: int = 64  # text transformer width (and the image head's hidden width)
    heads: int = 4
    text_layers: int = 2
    stem: int = 4  # patch side of the first conv (its kernel and stride)
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # stem, then one stride-2 3×3 block each
    map_side: int = 4  # side of the final feature map, flattened (64 / 4 / 2² = 4 at the default size)
    embed_dim: int = 64  # shared embedding size
    init_temperature: float = 0.07  # CLIP's initial softmax temperature

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RerankerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown reranker config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


class TextEncoder(nn.Module):
    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(cfg.text_len, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B, L) long, right-padded with 0 → (B, embed_dim), not normalised."""
        pad = ids == 0  # (B, L)
        pad[:, 0] = False  # an empty caption still attends to one slot: an all-masked row would give NaN
        h = self.tokens(ids) + self.positions[: ids.shape[1]]  # (B, L, width)
        h = self.norm(self.blocks(h, src_key_padding_mask=pad))  # (B, L, width)
        keep = (~pad).unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        pooled = (h * keep).sum(1) / keep.sum(1)  # (B, width): mean over real tokens
        return self.proj(pooled)  # (B, embed_dim)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__()
        # A patchify stem (stride = kernel = cfg.stem) instead of a 3×3 conv at full resolution: on a CPU the
        # full-size maps dominate the step time, and a 4-px patch still resolves the smallest shapes (~13 px).
        c_in = 5  # RGB + (x, y) coordinates, so even the stem knows where it is
        blocks: list[nn.Module] = [nn.Conv2d(c_in, cfg.channels[0], cfg.stem, stride=cfg.stem)]
        blocks += [nn.GroupNorm(min(8, cfg.channels[0]), cfg.channels[0]), nn.GELU()]
        for c_prev, c in zip(cfg.channels[:-1], cfg.channels[1:]):
            blocks += [nn.Conv2d(c_prev, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.GELU()]
        self.convs = nn.Sequential(*blocks)
        self.map_side = cfg.map_side
        self.proj = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cfg.channels[-1] * cfg.map_side**2, cfg.width),
            nn.GELU(),
            nn.Linear(cfg.width, cfg.embed_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) float in [0, 1] → (B, embed_dim), not normalised."""
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        fmap = self.convs(torch.cat([x - 0.5, xs, ys], dim=1))  # (B, C, H/(stem·2^k), W/(stem·2^k))
        if fmap.shape[-1] != self.map_side or fmap.shape[-2] != self.map_side:
            fmap = F.adaptive_avg_pool2d(fmap, self.map_side)  # (B, C, m, m): other input sizes
        return self.proj(fmap)  # (B, embed_dim): the map is flattened, so position survives


def to_nchw_uint8(images: Tensor | np.ndarray) -> Tensor:
    """uint8 images (N, 3, H, W) or (N, H, W, 3), tensor or array → (N, 3, H, W) uint8 tensor."""
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 images (N, 3, H, W) or (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] == 3:
        return x
    if x.shape[-1] == 3:
        return x.permute(0, 3, 1, 2)  # (N, 3, H, W)
    raise ValueError(f"expected 3 channels first or last, got shape {tuple(x.shape)}")


class ContrastiveReranker(nn.Module):
    """CLIP in miniature: ``score(images, captions)`` → cosine similarity of each image with its caption."""

    def __init__(self, cfg: RerankerConfig, tokenizer: CaptionTokenizer | None = None) -> None:
        super().__init__()
        from ..data.text import ByteTokenizer

        self.cfg = cfg
        self.tokenizer: CaptionTokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} ids, the model embeds {cfg.vocab_size}")
        self.text = TextEncoder(cfg)
        self.image = ImageEncoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def tokenize(self, captions: list[str]) -> Tensor:
        """captions → (B, L) long on the model's device, right-padded with 0, L ≤ text_len."""
        from ..data.text import pad_batch

        rows = [self.tokenizer.encode(c, self.cfg.text_len) for c in captions]
        # Only as long as the longest caption: trailing all-pad columns change nothing but cost attention.
        length = max(1, max(len(r) for r in rows))
        return pad_batch(rows, length).to(self.device)  # (B, L ≤ text_len)

    def prepare_images(self, images: Tensor | np.ndarray) -> Tensor:
        """uint8 (N, 3, H, W) or (N, H, W, 3) → float (N, 3, S, S) in [0, 1] on the model's device."""
        x = to_nchw_uint8(images).to(self.device).float().div(255)  # (N, 3, H, W)
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)  # (N, 3, S, S)
        return x

    def encode_images(self, x: Tensor) -> Tensor:
        """float (N, 3, S, S) in [0, 1] → (N, embed_dim), unit length."""
        return F.normalize(self.image(x), dim=-1)

    def encode_texts(self, ids: Tensor) -> Tensor:
        """(N, L ≤ text_len) long → (N, embed_dim), unit length."""
        return F.normalize(self.text(ids), dim=-1)

    def scale(self) -> Tensor:
        """exp(logit_scale), capped at 100 [CLIP]."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    @torch.no_grad()
    def score(self, images: Tensor | np.ndarray, captions: list[str], chunk: int = 256) -> Tensor:
        """Cosine similarity (N,) of image i with captions[i]; one caption is compared with every image."""
        n = images.shape[0]
        if len(captions) not in (1, n):
            raise ValueError(f"{n} images need 1 or {n} captions, got {len(captions)}")
        was_training = self.training
        self.eval()
        out = []
        for start in range(0, n, chunk):
            img = self.encode_images(self.prepare_images(images[start : start + chunk]))  # (c, D)
            caps = captions if len(captions) == 1 else captions[start : start + chunk]
            txt = self.encode_texts(self.tokenize(caps))  # (c or 1, D)
            out.append((img * txt).sum(-1).float().cpu())  # (c,)
        self.train(was_training)
        return torch.cat(out)  # (N,)
