"""Train the contrastive reranker on image-caption shards; save and load it without pickle.

``train_reranker`` streams batches through the same shard pipeline as the dVAE and prior (docs/data.md) with
Listing 2's preprocessing [P B.2]: near-centre crops and never a blind horizontal flip. Listing 1 flips half the
images without touching the captions, which would teach the model that "left" and "right" are interchangeable;
the mirrored copies of :mod:`dalle_dist.rerank.negatives` swap the words along with the pixels instead.

A fixed share of the samples (by a hash of their key) is held out of training; the first ``eval_size`` of them
measure retrieval at the end. The output directory is self-contained::

    OUT/reranker.safetensors   weights
    OUT/reranker.json          {"format", "config", "tokenizer": {"kind": "bpe"|"byte", "file"}, "metrics", ...}
    OUT/tokenizer.json         copy of the BPE tokenizer (kind "bpe" only)
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..config import DataConfig
from ..data.decode import Skip
from ..data.pipeline import ImageProcessor, ImageSample, ShardLoader, collate_images
from ..data.shards import ShardReader, expand_shards
from ..devices import resolve_device
from .loss import clip_loss, retrieval_metrics
from .model import CaptionTokenizer, ContrastiveReranker, RerankerConfig
from .negatives import add_mirrored, swapped_captions

WEIGHTS = "reranker.safetensors"
CONFIG = "reranker.json"
TOKENIZER = "tokenizer.json"
FORMAT = "dalle_dist.reranker/1"


# --------------------------------------------------------------------------------------------------
# Data: a key-hash split of the same shards
# --------------------------------------------------------------------------------------------------


def is_heldout(key: str, every: int) -> bool:
    """One sample in ``every`` (by a CRC of its key, so any reader agrees without coordination) is held out."""
    return every > 0 and zlib.crc32(key.encode()) % every == 0


class SplitImageProcessor(ImageProcessor):
    """The pipeline's image processor restricted to one side of the key-hash split."""

    def __init__(self, mode: str, resolution: int, data: DataConfig, every: int, heldout: bool) -> None:
        super().__init__(mode, resolution, data)
        self.every, self.heldout = every, heldout

    def _process(self, raw: dict[str, Any], counted: Counter) -> ImageSample | Skip:
        if is_heldout(str(raw.get("__key__", "")), self.every) != self.heldout:
            return Skip("other_split")
        return super()._process(raw, counted)


def heldout_batch(shards: list[str], data: DataConfig, resolution: int, every: int, size: int) -> dict[str, Any]:
    """Up to ``size`` held-out samples from one pass over the shards, deterministic (centre crops, tar order)."""
    proc = SplitImageProcessor("centre", resolution, data, every, heldout=True)
    skipped, counted, items = Counter(), Counter(), []
    for raw in ShardReader(shards, loop=False, skipped=skipped):
        item = proc(raw, skipped, counted)
        if item is not None:
            items.append(item)
            if len(items) == size:
                break
    if len(items) < 2:
        raise ValueError(
            f"only {len(items)} held-out sample(s) in the shards (one in {every} by key): use more data or "
            "a smaller holdout_every"
        )
    return collate_images(items)


# --------------------------------------------------------------------------------------------------
# Save / load (safetensors + JSON, never pickle)
# --------------------------------------------------------------------------------------------------


def _tokenizer_for(path: str | Path | None) -> tuple[CaptionTokenizer, str]:
    if path is None:
        from ..data.text import ByteTokenizer

        return ByteTokenizer(), "byte"
    from ..data.tokenizer import load_tokenizer

    return load_tokenizer(str(path)), "bpe"


def save_reranker(
    model: ContrastiveReranker,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write weights, config and (for BPE) a copy of the tokenizer JSON into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok: dict[str, Any] = {"kind": "byte"}
    if tokenizer_path is not None:
        if Path(tokenizer_path).resolve() != (out / TOKENIZER).resolve():
            shutil.copyfile(tokenizer_path, out / TOKENIZER)
        tok = {"kind": "bpe", "file": TOKENIZER}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "config": model.cfg.to_dict(), "tokenizer": tok, **(extra or {})}
    (out / CONFIG).write_text(json.dumps(doc, indent=2))
    return out


def load_reranker(path: str | Path, device: str | torch.device = "cpu") -> tuple[ContrastiveReranker, CaptionTokenizer]:
    """(model in eval mode, its tokenizer) from a ``train-reranker`` directory; JSON + safetensors only."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a reranker: expected {WEIGHTS} and {CONFIG} (dalle-dist train-reranker)"
        )
    doc = json.loads((path / CONFIG).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG}: format {doc.get('format')!r}, expected {FORMAT!r}")
    kind = doc["tokenizer"]["kind"]
    if kind not in ("byte", "bpe"):
        raise ValueError(f"{path / CONFIG}: unknown tokenizer kind {kind!r}")
    tokenizer, _ = _tokenizer_for(path / doc["tokenizer"]["file"] if kind == "bpe" else None)
    model = ContrastiveReranker(RerankerConfig.from_dict(doc["config"]), tokenizer)
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer(model: ContrastiveReranker, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay weight matrices, conv kernels and positions only: not token embeddings (rare tokens would shrink
    # towards zero between their few updates), gains, biases or the logit scale.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("text.tokens")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("text.tokens"))]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _train_step(
    model: ContrastiveReranker, opt: torch.optim.Optimizer, batch: dict[str, Any], mirror: bool, swap_negatives: bool
) -> float:
    """One contrastive step on ``batch`` (mirrored pairs and swapped-caption negatives as asked); its loss."""
    images, captions = batch["images"], batch["captions"]  # (B, 3, S, S) uint8, B captions
    if mirror:
        images, captions = add_mirrored(images, captions)  # (B', 3, S, S): mirrored pairs appended
    model.train()
    img = model.encode_images(model.prepare_images(images))  # (B', D)
    txt = model.encode_texts(model.tokenize(captions))  # (B', D)
    # The mirrored pairs already contrast left with right; text negatives are then only needed vertically.
    negs = swapped_captions(captions, ("v",) if mirror else ("h", "v")) if swap_negatives else []
    neg = model.encode_texts(model.tokenize(negs)) if negs else None  # (E, D): text-only hard negatives
    loss = clip_loss(img, txt, model.scale(), captions, neg, negs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _train_loop(
    model: ContrastiveReranker,
    opt: torch.optim.Optimizer,
    loader: ShardLoader,
    steps: int,
    lr: float,
    warmup: int,
    *,
    mirror: bool,
    swap_negatives: bool,
    progress: bool,
) -> list[float]:
    """``steps`` steps on the loader's batches under the warm-up + cosine schedule; the loss of each."""
    losses: list[float] = []
    bar = tqdm(total=steps, desc="train reranker", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        losses.append(_train_step(model, opt, loader.next_batch(), mirror, swap_negatives))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{model.scale().item():.1f}")
    bar.close()
    return losses


def _summary(
    model: ContrastiveReranker,
    losses: list[float],
    loader: ShardLoader,
    batch_size: int,
    held: dict[str, Any] | None,
) -> dict[str, Any]:
    """The run's losses, logit scale, skip counts and (with a held-out batch) retrieval metrics."""
    tail = losses[-min(20, len(losses)) :]
    summary: dict[str, Any] = {
        "steps": len(losses),
        "batch_size": batch_size,
        "first_loss": round(losses[0], 4),
        "loss": round(sum(tail) / len(tail), 4),  # mean of the last (up to) 20 steps: one batch is noisy
        "logit_scale": round(model.scale().item(), 3),
        "skipped": {k: v for k, v in loader.skipped.items() if k != "other_split"},  # held-out keys aren't bad data
    }
    if held is not None:
        metrics = retrieval_metrics(model, held["images"], held["captions"])
        summary["heldout"] = {k: round(v, 4) for k, v in metrics.items()}
    return summary


def train_reranker(
    shards: str,
    tokenizer_path: str | Path | None,
    out_dir: str | Path,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    *,
    device: str = "auto",
    config: RerankerConfig | None = None,  # default: the tokenizer's vocabulary, text_len 32 (BPE) or 96 (bytes)
    weight_decay: float = 0.05,  # AdamW, on matrices and kernels only (see _optimizer)
    warmup: int = 50,  # linear warm-up steps, then cosine decay to a tenth of lr
    holdout_every: int = 20,  # one sample in this many (by key) is held out of training; 0: none
    eval_size: int = 256,  # held-out samples scored at the end
    shuffle_buffer: int = 1000,
    mirror: bool = True,  # append a left-right mirrored copy of each sample whose caption names a side, sides swapped
    swap_negatives: bool = True,  # captions with their spatial words swapped as text-only hard negatives
    progress: bool = True,
) -> dict[str, Any]:
    """Train on ``shards`` (all but one sample in ``holdout_every``), save to ``out_dir``; returns the summary."""
    if steps < 1 or batch_size < 2:
        raise ValueError("steps must be >= 1 and batch_size >= 2 (a contrastive batch needs negatives)")
    t0 = time.monotonic()
    torch.manual_seed(seed)
    dev = resolve_device(device)
    tokenizer, kind = _tokenizer_for(tokenizer_path)
    # Byte captions of the shapes set run to ~80 ids, BPE ones to ~15.
    cfg = config or RerankerConfig(text_len=32 if kind == "bpe" else 96, vocab_size=tokenizer.vocab_size)
    model = ContrastiveReranker(cfg, tokenizer).to(dev)
    urls = expand_shards(shards)
    data = DataConfig(source="shards", shards=shards, batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer)
    train_proc = SplitImageProcessor("prior", cfg.image_size, data, holdout_every, heldout=False)
    loader = ShardLoader(urls, train_proc, collate_images, batch_size, seed=seed, shuffle=shuffle_buffer)
    held = heldout_batch(urls, data, cfg.image_size, holdout_every, eval_size) if holdout_every > 0 else None
    opt = _optimizer(model, lr, weight_decay)
    losses = _train_loop(
        model, opt, loader, steps, lr, warmup, mirror=mirror, swap_negatives=swap_negatives, progress=progress
    )
    summary = _summary(model, losses, loader, batch_size, held)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["tokenizer"] = kind
    source = {"shards": shards, "tokenizer": str(tokenizer_path) if tokenizer_path else None, "seed": seed}
    save_reranker(model.cpu(), out_dir, tokenizer_path, extra={"metrics": summary, "source": source})
    summary["out"] = str(out_dir)
    return summary
