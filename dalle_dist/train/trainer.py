"""The single-process training loop shared by both stages: build → step → save / load, with JSONL metrics.

Subclasses say what a batch is, how the model makes a loss from it, and how the learning rate moves. The
distributed engine wraps the same pieces (model, optimizer, batch stream) rather than owning its own loop.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..config import DVAERunConfig, PriorRunConfig, to_dict
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .ema import EMA

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use --train.device cpu")
    return torch.device(name)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and conv kernels only; none on gains, biases and embeddings.

    The paper does not say which parameters decay (spec §5, UNVERIFIED); excluding gains, biases and
    embeddings is the common transformer practice. Embedding parameters live under ``embed.``.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.startswith("embed.") else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Trainer(ABC):
    """One stage's training run. ``build()`` then ``step()`` repeatedly, or ``fit()`` for the whole run."""

    stage: str = ""

    def __init__(self, cfg: DVAERunConfig | PriorRunConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out_dir = Path(cfg.train.out_dir)
        self.device = resolve_device(cfg.train.device)
        self.step_num = 0
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.ema: EMA
        # The trainer's own randomness (Gumbel noise, sampling) comes from generators we checkpoint.
        self.generators: dict[str, torch.Generator] = {}
        self._built = False

    # ---- what a stage defines -------------------------------------------------------------------

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def build_data(self) -> None: ...

    @abstractmethod
    def next_batch(self) -> Any: ...

    @abstractmethod
    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    @abstractmethod
    def lr_at(self, step: int) -> float: ...

    def after_step(self, metrics: dict[str, float]) -> None:
        """Hook for stateful schedules (the prior's plateau rule)."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def data_state(self) -> dict[str, Any]:
        return {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- build / step / save / load ---------------------------------------------------------------

    def build(self) -> Trainer:
        torch.manual_seed(self.cfg.train.seed)
        self.model = self.build_model().to(self.device)
        optim = self.cfg.optim
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, optim.weight_decay),
            lr=self.lr_at(0),
            betas=optim.betas,
            eps=optim.eps,
        )
        self.ema = EMA(self.model, optim.ema_decay, optim.ema_every)
        self.build_data()
        self._built = True
        return self

    def step(self) -> dict[str, float]:
        """One update: batch → loss → backward → clip → AdamW → EMA. Returns the step's metrics."""
        if not self._built:
            raise RuntimeError("call build() before step()")
        t0 = time.perf_counter()
        self.model.train()
        lr = self.lr_at(self.step_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.next_batch()
        loss, metrics = self.compute_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {self.step_num}; lower --optim.lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step_num += 1
        out = {k: float(v) for k, v in metrics.items()}
        out.update(step=self.step_num, lr=lr, grad_norm=float(grad_norm), step_seconds=time.perf_counter() - t0)
        self.after_step(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "config": to_dict(self.cfg),
            "step": self.step_num,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "extra": self.extra_state(),
            "data": self.data_state(),
            "rng": rng_state(self.generators),
        }

    def save(self, path: str | Path | None = None) -> Path:
        return save_checkpoint(path or self.out_dir / CHECKPOINT_NAME, self.state_dict())

    def load(self, path: str | Path | None = None) -> None:
        """Restore a run saved by :meth:`save`; the run continues exactly where it stopped."""
        state = load_checkpoint(path or self.out_dir / CHECKPOINT_NAME)
        if state.get("stage") != self.stage:
            raise ValueError(f"checkpoint is for stage {state.get('stage')!r}, not {self.stage!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.load_extra_state(state["extra"])
        self.load_data_state(state["data"])
        set_rng_state(state["rng"], self.generators)
        self.step_num = int(state["step"])

    # ---- the loop ---------------------------------------------------------------------------------

    def fit(self) -> list[dict[str, float]]:
        """Run to ``train.steps``, resuming from ``out_dir`` when a checkpoint is there."""
        if not self._built:
            self.build()
        ckpt = self.out_dir / CHECKPOINT_NAME
        if self.cfg.train.resume and ckpt.is_file():
            self.load(ckpt)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
        total = self.cfg.train.steps
        history: list[dict[str, float]] = []
        bar = tqdm(
            total=total,
            initial=self.step_num,
            desc=f"train {self.stage}",
            disable=not self.cfg.train.progress,
            dynamic_ncols=True,
        )
        with open(self.out_dir / METRICS_NAME, "a") as log:
            while self.step_num < total:
                metrics = self.step()
                history.append(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                every = self.cfg.train.log_every
                if every > 0 and (self.step_num % every == 0 or self.step_num == total):
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                save_every = self.cfg.train.save_every
                if save_every > 0 and self.step_num % save_every == 0:
                    self.save()
        bar.close()
        self.save()
        return history
