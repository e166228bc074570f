"""Sparse attention of the DALL-E prior: per-layer mask kinds, boolean masks, the kernel seam, a KV cache.

The prior attends over one stream of ``T = text_len + grid²`` slots: text slots first, then image slots in raster
order. Every layer uses a single softmax over text and image keys together [P fn 7]; what differs between layers
is only which image keys an image query may see (row, column or convolutional pattern) [P §2.2, B.1, Fig. 11].

Masks are plain ``(T, T)`` boolean tensors (True = query may attend key), built on demand and cached per device.
They are never parameters or buffers, so they stay out of state dicts and work for modules built on ``meta``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ATTN_LAYOUTS

MASK_KINDS: tuple[str, ...] = ("row", "column", "conv", "dense")


def layer_kinds(n_layers: int, layout: str = "paper") -> list[str]:
    """Mask kind of each attention layer, first to last [P B.1].

    ``paper``: the last layer is convolutional; layer ``i`` (1-based) of the others is "column" if
    ``(i - 2) % 4 == 0`` and "row" otherwise, so 64 layers give row, column, row, row, row, column, ... (16 column,
    47 row, conv last). ``dense``: every layer is plain causal. The sparse masks save compute only with a kernel
    that skips masked tiles; with the dense-mask kernel they cost as much as dense attention, and a few-layer
    model sees less context through them (docs/demo.md measures the difference on the shapes set).
    """
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers} must be >= 1")
    if layout not in ATTN_LAYOUTS:
        raise ValueError(f"unknown attention layout {layout!r}; valid layouts: {list(ATTN_LAYOUTS)}")
    if layout == "dense":
        return ["dense"] * n_layers
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers)]
    return kinds + ["conv"]


def _image_mask(kind: str, grid: int, conv_kernel: int) -> Tensor:
    """(n, n) image→image part of a mask, ``n = grid²``, indices in raster order; always raster-causal."""
    idx = torch.arange(grid * grid, device="cpu")  # explicit device: ignore a surrounding `with torch.device("meta")`
    a, b = idx[:, None], idx[None, :]  # query, key: (n, 1), (1, n)
    causal = b <= a  # (n, n)
    if kind == "dense":
        return causal
    if kind == "row":
        # The previous `grid` tokens in raster order plus self: for grid 4 the window is 5, so "the last token
        # being attended to is the one in the same column of the previous row" [P Fig. 11]; wraps across rows.
        return causal & (b >= a - grid)
    if kind == "column":
        # Same column, earlier rows. The paper transposes the image states to reuse the row kernel for speed
        # [P Fig. 11]; as a mask on raster indices it is this.
        return causal & (b % grid == a % grid)
    # conv: the causal part of a k×k neighbourhood centred on the query [P B.1: 11×11].
    r = conv_kernel // 2
    near_rows = (b // grid - a // grid).abs() <= r
    near_cols = (b % grid - a % grid).abs() <= r
    return causal & near_rows & near_cols


def layer_mask(kind: str, text_len: int, grid: int, conv_kernel: int = 11) -> Tensor:
    """(T, T) boolean mask, ``T = text_len + grid²``: True where query slot i may attend key slot j.

    Text→text is causal and text never sees image slots; every image query sees every text key in every layer
    [P §2.2]. Image→image (query a, key b, raster indices, always b ≤ a):

    - ``row``: ``a - grid ≤ b ≤ a``, a sliding raster window of grid + 1 tokens that wraps across rows [P Fig. 11].
    - ``column``: ``b % grid == a % grid`` [P Fig. 11].
    - ``conv``: ``|row(b) - row(a)| ≤ k//2`` and ``|col(b) - col(a)| ≤ k//2``, i.e. the raster-causal part of a
      k×k window centred on the query. The paper's Fig. 11 caption calls its conv mask one "with wraparound
      behavior"; the exact rule is not given, and we deliberately use the plain 2-D neighbourhood: a query near
      the left edge does not see keys at the right end of earlier rows (no wraparound across the image edge).
    - ``dense``: plain causal over all slots (for tests and comparisons).

    Built with broadcasting (no loops over slot pairs) on the CPU; use :func:`cached_layer_mask` in models.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown attention mask kind {kind!r}; valid kinds: {list(MASK_KINDS)}")
    if text_len < 0 or grid < 1 or conv_kernel < 1:
        raise ValueError(f"need text_len >= 0, grid >= 1, conv_kernel >= 1; got {text_len}, {grid}, {conv_kernel}")
    seq = text_len + grid * grid
    idx = torch.arange(seq, device="cpu")
    mask = idx[None, :] <= idx[:, None]  # (T, T) causal: gives text causality and image→all-text
    mask[text_len:, text_len:] = _image_mask(kind, grid, conv_kernel)  # (n, n)
    return mask


@functools.lru_cache(maxsize=64)
def _cached_mask(kind: str, text_len: int, grid: int, conv_kernel: int, device: torch.device) -> Tensor:
    return layer_mask(kind, text_len, grid, conv_kernel).to(device)


def cached_layer_mask(
    kind: str, text_len: int, grid: int, conv_kernel: int, device: torch.device | str = "cpu"
) -> Tensor:
    """:func:`layer_mask` on ``device``, built once per (kind, shape, device). Shared: do not modify in place."""
    return _cached_mask(kind, text_len, grid, conv_kernel, torch.device(device))


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Masked softmax attention, the single place the kernel is called.

    q: (B, nh, Tq, hd); k, v: (B, nh, Tk, hd); mask: (Tq, Tk) bool, True = attend. One softmax over text and image
    keys together [P fn 7]. A FlexAttention ``BlockMask`` backend (block size 32, as in the paper's blocksparse
    kernels [I#28]) plugs in here: same mask rule, skipping fully masked 32×32 tiles.
    """
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        # The CPU flash-attention kernel is slower in 16 bits than in fp32 (its bf16 backward especially): a 16-bit
        # step of the demo prior took 0.149 s with 16-bit attention, 0.099 s with this (docs/precision.md). Only
        # the kernel's inputs are upcast; the projections around it keep running under autocast.
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)  # (B, nh, Tq, hd)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, Tq, hd)


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Stores every position (B, nh, max_len, hd), so it serves all mask kinds: the mask row of each new query picks
    the keys it may see. The tensors are allocated once, at full length, on the first write, with the dtype and
    device of the keys written (these follow autocast and the stage's device, which the caller need not know).
    """

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int) -> None:
        self.shape = (batch, n_heads, max_len, head_dim)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0  # positions 0..length-1 hold valid keys/values

    @property
    def max_len(self) -> int:
        return self.shape[2]

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T', hd) at positions start..start+T'-1; return keys/values 0..start+T'-1."""
        end = start + k.shape[2]
        if start > self.length:
            raise ValueError(f"KV cache holds {self.length} positions; cannot write at {start} (gap)")
        if end > self.max_len:
            raise ValueError(f"KV cache of length {self.max_len} cannot hold positions up to {end - 1}")
        if tuple(k.shape[:2]) != self.shape[:2] or k.shape[3] != self.shape[3]:
            raise ValueError(f"keys of shape {tuple(k.shape)} do not fit a KV cache of shape {self.shape}")
        if self.k is None or self.v is None:
            self.k = k.new_zeros(self.shape)  # (B, nh, max_len, hd)
            self.v = v.new_zeros(self.shape)  # (B, nh, max_len, hd)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end  # anything after `end` written earlier is stale now
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, nh, end, hd)


class Attention(nn.Module):
    """Multi-head self-attention with one fixed mask kind [P B.1]; q, k, v and output are d×d with bias [P Table 2]."""

    def __init__(self, d_model: int, n_heads: int, kind: str, text_len: int, grid: int, conv_kernel: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if kind not in MASK_KINDS:
            raise ValueError(f"unknown attention mask kind {kind!r}; valid kinds: {list(MASK_KINDS)}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.kind = kind
        self.text_len = text_len
        self.grid = grid
        self.conv_kernel = conv_kernel
        self.seq_len = text_len + grid * grid
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n_heads={self.n_heads}, head_dim={self.head_dim}"

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T', hd)

    def forward(self, x: Tensor, start: int = 0, cache: KVCache | None = None) -> Tensor:
        """x: (B, T', d) holding slots start..start+T'-1 → (B, T', d).

        Without a cache the input must be the sequence from slot 0 (full or a prefix). With a cache the new keys
        and values are stored and the queries see all cached slots their mask rows allow.
        """
        b, n, d = x.shape
        end = start + n
        if end > self.seq_len:
            raise ValueError(f"slots {start}..{end - 1} exceed the sequence length {self.seq_len}")
        if cache is None and start != 0:
            raise ValueError(f"start={start} without a KV cache: pass the sequence from slot 0 or a cache")
        q = self._heads(self.q_proj(x))  # (B, nh, T', hd)
        k = self._heads(self.k_proj(x))  # (B, nh, T', hd)
        v = self._heads(self.v_proj(x))  # (B, nh, T', hd)
        if cache is not None:
            k, v = cache.update(k, v, start)  # (B, nh, end, hd)
        mask = cached_layer_mask(self.kind, self.text_len, self.grid, self.conv_kernel, x.device)
        y = attend(q, k, v, mask[start:end, :end])  # (B, nh, T', hd)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))  # (B, T', d)
