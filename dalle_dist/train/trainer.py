"""The single-process training loop shared by both stages: build → step → save / load, with JSONL metrics.

Subclasses say what a batch is, how the model makes a loss from it, and how the learning rate moves. The
distributed engine wraps the same pieces (model, optimizer, batch stream) rather than owning its own loop.
Numerics (``cfg.precision``; docs/precision.md): 16-bit storage and autocast from outside the model, fp32 gains,
biases, embeddings and logits, per-resblock gradient scales (prior, fp16) or one global loss scale (dVAE, fp16),
and a skipped update whenever any gradient is nonfinite [P §2.4, App. D].
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
from ..devices import resolve_device
from ..precision import (
    AdamW32,
    PrecisionPolicy,
    ResblockGradScaler,
    apply_activation_checkpointing,
    apply_precision,
    branch_modules,
    sync_finite_flags,
)
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .ema import EMA
from .metrics import MetricsLogger

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


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
        cfg.precision.validate()
        self.device = resolve_device(cfg.train.device, "--train.device")
        self.step_num = 0
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.ema: EMA
        self.policy: PrecisionPolicy
        self.grad_scaler: ResblockGradScaler | None = None  # per-resblock scales (prior, fp16) [P D.1]
        self.loss_scaler: torch.amp.GradScaler | None = None  # one global loss scale (dVAE, fp16) [P A.2]
        # Data-parallel replicas M and their process group; the distributed engine sets these. The loss is divided
        # by M and the replicas' gradients are summed, i.e. the loss is divided by the global batch [P D.3].
        self.replicas = 1
        self.process_group: torch.distributed.ProcessGroup | None = None
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
        self.build_numerics()
        optim = self.cfg.optim
        self.optimizer = AdamW32(
            decay_groups(self.model, optim.weight_decay),
            lr=self.lr_at(0),
            betas=optim.betas,
            eps=optim.eps,
            master_weights=self.cfg.precision.master_weights,
            moments_dtype=torch.bfloat16 if self.cfg.precision.moments_dtype == "bf16" else torch.float32,
        )
        self.ema = EMA(self.model, optim.ema_decay, optim.ema_every)
        self.build_data()
        self._built = True
        return self

    def build_numerics(self) -> None:
        """Storage dtypes, autocast, activation checkpointing and gradient scaling from ``cfg.precision``.

        Runs before the optimizer is built, so the optimizer sees the final (16-bit or fp32) parameters.
        """
        prec = self.cfg.precision
        self.policy = apply_precision(self.model, prec)
        if prec.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if self.policy.scaling == "per_resblock":
            self.grad_scaler = ResblockGradScaler(list(branch_modules(self.model)), prec, replicas=self.replicas)
            self.grad_scaler.attach(self.model)
        elif self.policy.scaling == "global":
            self.loss_scaler = torch.amp.GradScaler(self.device.type)

    def _grad_norm(self) -> float:
        """Global L2 norm of the gradients, accumulated in fp32 (16-bit norms overflow early)."""
        norms = [
            torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in self.model.parameters() if p.grad is not None
        ]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _clip_coef(self, norm: float) -> float:
        clip = self.cfg.optim.grad_clip  # global-norm clip [P B.2]; 0 disables
        return min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0

    def backward_and_update(self, loss: torch.Tensor) -> tuple[bool, float, dict[str, float]]:
        """Backward, nonfinite check, clip and optimizer step; returns (applied, grad norm, numerics metrics).

        A nonfinite gradient is never applied: the update (parameters, Adam moments, EMA) is skipped, on every rank
        together when there are replicas [P D.1, E.2(2)].
        """
        loss = loss / self.replicas  # [P D.3]: local mean ÷ M, gradients summed over replicas = global-batch mean
        if self.grad_scaler is not None:
            scaler = self.grad_scaler
            loss.backward()  # the hooks scale each resblock's incoming gradient and unscale + filter its outgoing one
            finite = sync_finite_flags(scaler.unscale_(self.model), self.process_group)
            applied = scaler.update(finite)  # the multipliers below still hold this step's scales
            norm = scaler.grad_norm()
            if applied:
                self.optimizer.step(grad_scale=scaler.grad_multipliers(self._clip_coef(norm)))
            return applied, norm, scaler.telemetry()
        if self.loss_scaler is not None:
            ls = self.loss_scaler
            ls.scale(loss).backward()
            ls.unscale_(self.optimizer)
            norm = self._grad_norm()
            finite = sync_finite_flags({"all": math.isfinite(norm)}, self.process_group)["all"]
            if finite:
                ls.step(self.optimizer, grad_scale=self._clip_coef(norm))
                ls.update()
            else:  # GradScaler's own backoff, decided from the synchronised flag so every rank agrees
                ls.update(ls.get_scale() * ls.get_backoff_factor())
            return finite, norm, {"loss_scale": ls.get_scale()}
        loss.backward()
        norm = self._grad_norm()
        finite = sync_finite_flags({"all": math.isfinite(norm)}, self.process_group)["all"]
        if finite:
            self.optimizer.step(grad_scale=self._clip_coef(norm))
        return finite, norm, {}

    def step(self) -> dict[str, float]:
        """One update: batch → loss → backward → unscale/check → clip → AdamW → EMA. Returns the step's metrics."""
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
        applied, grad_norm, numerics = self.backward_and_update(loss)
        if applied:
            self.ema.update(self.model)  # a skipped update changes nothing, the average included
        self.step_num += 1  # counts batches: the data cursor and lr schedule advance over skipped updates too
        out = {k: float(v) for k, v in metrics.items()}
        out.update(step=self.step_num, lr=lr, grad_norm=grad_norm, skipped=float(not applied))
        out.update(numerics, step_seconds=time.perf_counter() - t0)
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
            "precision": {
                "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
                "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None,
            },
        }

    def save(self, path: str | Path | None = None) -> Path:
        return save_checkpoint(path or self.out_dir / CHECKPOINT_NAME, self.state_dict())

    def load(self, path: str | Path | None = None) -> None:
        """Restore a run saved by :meth:`save`; the run continues exactly where it stopped."""
        state = load_checkpoint(path or self.out_dir / CHECKPOINT_NAME)
        if state.get("stage") != self.stage:
            raise ValueError(f"checkpoint is for stage {state.get('stage')!r}, not {self.stage!r}")
        prec = state.get("precision") or {}
        scalers = (("grad_scaler", self.grad_scaler), ("loss_scaler", self.loss_scaler))
        for name, obj in scalers:  # checked before anything is loaded
            if obj is not None and prec.get(name) is None:
                raise ValueError(
                    f"checkpoint has no {name} state but this run uses one (precision.dtype="
                    f"{self.cfg.precision.dtype!r}); resume with the checkpoint's precision settings"
                )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.load_extra_state(state["extra"])
        self.load_data_state(state["data"])
        set_rng_state(state["rng"], self.generators)
        for name, obj in scalers:
            if obj is not None:
                obj.load_state_dict(prec[name])
        self.step_num = int(state["step"])

    # ---- the loop ---------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        """The process that writes logs, progress and checkpoints (rank 0 of a data-parallel job)."""
        return True

    def fit(self) -> list[dict[str, float]]:
        """Run to ``train.steps``, resuming from ``out_dir`` when a checkpoint is there."""
        if not self._built:
            self.build()
        ckpt = self.out_dir / CHECKPOINT_NAME
        if self.cfg.train.resume and ckpt.is_file():
            self.load(ckpt)
        total = self.cfg.train.steps
        history: list[dict[str, float]] = []
        log = None
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
            log = MetricsLogger(self.out_dir, to_dict(self.cfg), self.cfg.train.wandb, name=self.stage)
        bar = tqdm(
            total=total,
            initial=self.step_num,
            desc=f"train {self.stage}",
            disable=not (self.cfg.train.progress and self.is_main),
            dynamic_ncols=True,
        )
        try:
            while self.step_num < total:
                metrics = self.step()
                history.append(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                every = self.cfg.train.log_every
                if log is not None and every > 0 and (self.step_num % every == 0 or self.step_num == total):
                    log.log(metrics)
                save_every = self.cfg.train.save_every
                if save_every > 0 and self.step_num % save_every == 0:
                    self.save()
            self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        return history
