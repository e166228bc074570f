"""Autoregressive image-token generation from the prior, with a KV cache or by full recomputation.

The paper samples at temperature 1 without top-k, then reranks 512 samples with CLIP [P §2.6]; image-to-image
translation primes the top 15×32 tokens of the grid [P §3.3]. Temperature and top-k are offered for experiments.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from dalle_dist.models.prior import DallePrior


def sample_logits(
    logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """One token per row of logits (B, V) → (B,) long. temperature 0 is greedy (argmax)."""
    if top_k is not None:
        k = min(top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def _check_inputs(model: DallePrior, text: Tensor, prime: Tensor | None, temperature: float, top_k: int | None) -> int:
    """Validate the arguments; return the number of primed tokens."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 or None")
    if prime is None:
        return 0
    n = model.cfg.image_len
    if prime.dim() != 2 or prime.shape[0] != text.shape[0] or prime.shape[1] > n or prime.dtype != torch.long:
        raise ValueError(
            f"prime must be a (B={text.shape[0]}, n_prime ≤ {n}) long tensor; got {tuple(prime.shape)} {prime.dtype}"
        )
    return prime.shape[1]


@torch.no_grad()
def generate_images(
    model: DallePrior,
    text: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    prime: Tensor | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample image tokens (B, grid²) for captions text (B, caption_len), raster order.

    prime (B, n_prime): the first n_prime tokens are given and copied to the output [P §3.3]. With ``use_cache``
    the text (and prime) is prefilled once, then each step runs only the newest slot through every layer using
    per-layer KV caches; without it every step recomputes the whole prefix (the reference path).
    """
    n_prime = _check_inputs(model, text, prime, temperature, top_k)
    n = model.cfg.image_len
    out = torch.zeros(text.shape[0], n, dtype=torch.long, device=text.device)  # (B, n)
    if prime is not None:
        out[:, :n_prime] = prime
    step = _cached_steps if use_cache else _recomputed_steps
    for j, logits in step(model, text, out, n_prime):
        out[:, j] = sample_logits(logits, temperature=temperature, top_k=top_k, generator=generator)
    return out


def _recomputed_steps(model: DallePrior, text: Tensor, out: Tensor, n_prime: int) -> Iterator[tuple[int, Tensor]]:
    """Yield (j, logits of z_j) with the full prefix recomputed each step; ``out[:, j]`` is filled between yields."""
    for j in range(n_prime, model.cfg.image_len):
        _, image_logits = model(text, out[:, :j])  # (B, j+1, V): row j predicts z_j
        yield j, image_logits[:, j]


def _cached_steps(model: DallePrior, text: Tensor, out: Tensor, n_prime: int) -> Iterator[tuple[int, Tensor]]:
    """Yield (j, logits of z_j) using KV caches: prefill text + prime, then one slot per step."""
    cfg = model.cfg
    caches = model.new_kv_caches(text.shape[0])
    h = model.embed(text, out[:, :n_prime])  # (B, text_len + n_prime, d)
    h = model.forward_incremental(h, 0, caches)  # (B, text_len + n_prime, d)
    for j in range(n_prime, cfg.image_len):
        if j > n_prime:
            h = model.embed.embed_image(out[:, j - 1 : j], start=j - 1)  # (B, 1, d): the token just sampled
            h = model.forward_incremental(h, cfg.text_len + j - 1, caches)  # (B, 1, d)
        yield j, model.head.image_logits(h[:, -1:])[:, 0]  # (B, V): slot text_len + j - 1 predicts z_j
