"""The dVAE's trainer for 1..N data-parallel ranks [P §2.1, A.2: 64 GPUs, per-GPU batch 8, total 512].

One process is the 1-rank job (``runtime.py``); under torchrun every rank is a replica. ``data.batch_size`` is
the global batch and each rank takes its slice; with more than one rank the model is wrapped in DDP whose comm
hook SUMS gradients (the loss is divided by the replica count M [P D.3], so the sum is the global-batch mean).
Gumbel noise comes from one generator per rank, seeded from (``train.seed``, rank); rank 0 writes
``checkpoint.pt`` (what ``load_dvae``, pretokenize and export read), holding every rank's cursor and generator
state, so a resumed run draws exactly what an unbroken one drew. One process draws the stream it always drew.

One update: forward → backward (global loss scale in fp16 [P A.2]) → unscale and check (finite flags ANDed over
the ranks) → clip in place → AdamW → EMA of applied updates → metrics; the loop is ``loop.fit``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError, DVAERunConfig, to_dict
from ..data.folder import EpochSampler, read_folder
from ..data.pipeline import check_shard_config, image_loader
from ..data.random_batches import random_images
from ..files import load_checkpoint, save_checkpoint
from ..models.dvae import DiscreteVAE, DVAEObjective
from ..precision import AdamW32, apply_activation_checkpointing, apply_precision, decay_groups, sync_finite_flags
from .checkpoint import rng_state, set_rng_state
from .ema import EMA
from .loop import LoopTrainer
from .runtime import init_distributed
from .schedules import DVAESchedules

CHECKPOINT_NAME = "checkpoint.pt"


def check_dvae_config(cfg: DVAERunConfig, world_size: int = 1) -> None:
    """Checks that need no process group: data source, and a global batch that splits over the ranks."""
    cfg.validate()
    if cfg.data.source == "tokens":
        raise ConfigError(
            "data.source=tokens holds dVAE codes for the prior; the dVAE trains on images: "
            "use --data.source shards --data.shards 'data/{000000..000009}.tar'"
        )
    if cfg.data.batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is the global batch and must divide evenly over {world_size} "
            f"processes; e.g. --data.batch_size {world_size * max(1, cfg.data.batch_size // world_size)}"
        )
    if cfg.data.source == "shards":
        check_shard_config(cfg.data, world_size)


def _sum_hook(group, bucket):  # noqa: ANN001 - DDP inspects real annotations; postponed ones (strings) fail its check
    """All-reduce SUM (DDP's default averages): the loss is already divided by the replica count."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DVAETrainer(LoopTrainer):
    """Stage 1: Gumbel-softmax relaxation with β, τ and lr on cosine schedules [P §2.1, A.2]."""

    stage = "dvae"
    run_name = "dvae"
    cfg: DVAERunConfig

    def __init__(self, cfg: DVAERunConfig) -> None:
        check_dvae_config(cfg)
        super().__init__(cfg)
        self.schedules = DVAESchedules.from_config(cfg.optim)
        self.objective = DVAEObjective.from_optim(cfg.optim)  # fixed for the run: built once, not every step

    @staticmethod
    def check_config(cfg: DVAERunConfig, world_size: int) -> None:
        check_dvae_config(cfg, world_size)

    def build(self) -> DVAETrainer:
        cfg, prec = self.cfg, self.cfg.precision
        self.device, self._created_group = init_distributed("auto", cfg.train.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_dvae_config(cfg, self.world)
        torch.manual_seed(cfg.train.seed)  # the same on every rank: identical initial weights
        self.model = DiscreteVAE(cfg.model).to(self.device)
        policy = apply_precision(self.model, prec)
        if prec.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        # One global loss scale in fp16 [P A.2]: the dVAE has no per-resblock scheme.
        self.loss_scaler = torch.amp.GradScaler(self.device.type) if policy.scaling == "global" else None
        o = cfg.optim
        moments = torch.bfloat16 if prec.moments_dtype == "bf16" else torch.float32
        self.optimizer = AdamW32(decay_groups(self.model, o.weight_decay), lr=self.schedules.lr_at(0), betas=o.betas,
                                 eps=o.eps, master_weights=prec.master_weights, moments_dtype=moments)  # fmt: skip
        self.ema = EMA(self.model, o.ema_decay, o.ema_every)
        self.forward_model: torch.nn.Module = self.model
        if self.world > 1:
            self.forward_model = DistributedDataParallel(self.model, broadcast_buffers=False)
            self.forward_model.register_comm_hook(dist.group.WORLD, _sum_hook)
        self.gumbel = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 1 + 7919 * self.rank)
        self._build_data()
        self._built = True
        return self

    # ---- data ---------------------------------------------------------------------------------------

    def _build_data(self) -> None:
        data = self.cfg.data
        self.per_rank = data.batch_size // self.world
        self.sampler: EpochSampler | None = None
        self.loader = None
        if data.source == "folder":
            self.images = read_folder(data.path, self.cfg.model.image_size).images
            self.sampler = EpochSampler(len(self.images), data.batch_size, data.seed)
        elif data.source == "shards":  # each rank reads its own shards with the per-rank batch [P A.2]
            local = dataclasses.replace(data, batch_size=self.per_rank)
            self.loader = image_loader("dvae", self.cfg.model.image_size, local, self.rank, self.world)

    def _batch(self) -> Tensor:
        """This rank's slice of the step's global batch, (B/M, 3, H, W) in [0, 1]."""
        data = self.cfg.data
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        if self.loader is not None:
            images = self.loader.next_batch()["images"]  # (B/M, 3, H, W) uint8
        elif self.sampler is not None:
            images = self.images[self.sampler.next_indices()[mine]]
        else:
            images = random_images(data.batch_size, self.cfg.model.image_size, data.seed, self.step_num)[mine]
        return images.to(self.device).float() / 255.0

    # ---- one update ---------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        if not self._built:
            raise RuntimeError("call build() before step()")
        t0 = time.perf_counter()
        self.model.train()
        lr = self.schedules.lr_at(self.step_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, metrics = self._forward(self._batch())
        if not math.isfinite(metrics["loss"]):  # averaged over the ranks: all stop together
            raise FloatingPointError(
                f"non-finite loss {metrics['loss']} at step {self.step_num}; lower --optim.lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        applied, grad_norm, numerics = self._backward_and_update(loss / self.world)  # [P D.3]
        if applied:
            self.ema.update(self.model)  # a skipped update changes nothing, the average included
        self.step_num += 1
        metrics.update(step=self.step_num, lr=lr, grad_norm=grad_norm, skipped=float(not applied))
        metrics.update(numerics, step_seconds=time.perf_counter() - t0)
        return metrics

    def _forward(self, images: Tensor) -> tuple[Tensor, dict[str, float]]:
        s = self.step_num
        temperature, kl_weight = self.schedules.temperature_at(s), self.schedules.kl_weight_at(s)
        loss, metrics = self.forward_model(
            images, temperature=temperature, kl_weight=kl_weight, generator=self.gumbel, objective=self.objective
        )
        names = sorted(metrics)  # global-batch means of the detached metrics
        stacked = torch.stack([metrics[k].detach().float().reshape(()) for k in names])
        dist.all_reduce(stacked)
        out = {k: float(v) / self.world for k, v in zip(names, stacked)}
        out.update(temperature=temperature, kl_weight=kl_weight)
        return loss, out

    def _grad_norm(self) -> float:
        """L2 norm of the (already summed over replicas) gradients, accumulated in fp32."""
        norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in self.model.parameters()
                 if p.grad is not None]  # fmt: skip
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _backward_and_update(self, loss: Tensor) -> tuple[bool, float, dict[str, float]]:
        """Backward, unscale, nonfinite check on every rank together, in-place clip, AdamW [P A.2, B.2]."""
        ls = self.loss_scaler
        if ls is not None:
            ls.scale(loss).backward()
            ls.unscale_(self.optimizer)
        else:
            loss.backward()
        norm = self._grad_norm()
        finite = sync_finite_flags({"all": math.isfinite(norm)})["all"]
        if finite:
            clip = self.cfg.optim.grad_clip  # global-norm clip; 0 disables
            if clip > 0 and (coef := clip / (norm + 1e-6)) < 1.0:
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)
            if ls is not None:
                ls.step(self.optimizer)
                ls.update()
            else:
                self.optimizer.step()
        elif ls is not None:  # GradScaler's own backoff, decided from the synchronised flag so every rank agrees
            ls.update(ls.get_scale() * ls.get_backoff_factor())
        return finite, norm, {"loss_scale": ls.get_scale()} if ls is not None else {}

    # ---- checkpoints, the loop ----------------------------------------------------------------------

    def _gathered(self, obj: Any) -> list[Any]:
        """Collective: ``obj`` of every rank, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _data_state(self) -> dict[str, Any]:
        """Collective: the folder sampler's cursor, or every rank's shard cursor gathered onto each rank."""
        if self.sampler is not None:
            return {"sampler": self.sampler.state_dict()}
        if self.loader is None:
            return {}
        return {"world": self.world, "cursors": self._gathered(self.loader.state_dict())}

    def save(self) -> Path:
        """Collective; rank 0 writes ``checkpoint.pt`` atomically."""
        data = self._data_state()
        gumbel = {"world": self.world, "states": self._gathered(self.gumbel.get_state())}
        target = self.out_dir / CHECKPOINT_NAME
        if self.is_main:
            state = {
                "stage": "dvae", "config": to_dict(self.cfg), "step": self.step_num,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "data": data, "rng": rng_state({}), "gumbel": gumbel,
                "precision": {"loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None},
            }  # fmt: skip
            save_checkpoint(target, state)
        dist.barrier()
        return target

    def load(self, path: str | Path) -> None:
        """Restore a run saved by :meth:`save` (or by the one-process trainer of earlier versions)."""
        state = load_checkpoint(path)
        if state.get("stage") != "dvae":
            raise ValueError(f"checkpoint is for stage {state.get('stage')!r}, not 'dvae'")
        saved_scaler = (state.get("precision") or {}).get("loss_scaler")
        if self.loss_scaler is not None and saved_scaler is None:
            raise ValueError(
                f"checkpoint has no loss_scaler state but this run uses one (precision.dtype="
                f"{self.cfg.precision.dtype!r}); resume with the checkpoint's precision settings"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"], {})
        self._load_gumbel(state)
        if self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(saved_scaler)
        self.step_num = int(state["step"])
        self._load_data_state(state.get("data") or {})

    def _load_gumbel(self, state: dict[str, Any]) -> None:
        """This rank's noise generator; earlier one-process files keep it under ``rng.generators.gumbel``."""
        saved = state.get("gumbel") or {}
        states = saved.get("states") or [state["rng"].get("generators", {}).get("gumbel")]
        if len(states) == self.world and states[self.rank] is not None:
            self.gumbel.set_state(states[self.rank])
        elif self.is_main:
            print(f"[dalle_dist] no Gumbel noise state for {self.world} rank(s) in the checkpoint: each rank's noise "
                  "restarts from its seed", flush=True)  # fmt: skip

    def _load_data_state(self, data: dict[str, Any]) -> None:
        if self.sampler is not None:
            self.sampler.load_state_dict(data.get("sampler", data))  # earlier one-process files: the bare cursor
        elif self.loader is not None:
            # {"world", "cursors": one loader state per rank}; earlier one-process files hold the loader state itself.
            cursors = data["cursors"] if "world" in data else [data] if "format" in data else []
            if len(cursors) == self.world:
                self.loader.load_state_dict(cursors[self.rank])
            elif self.is_main:
                print(f"[dalle_dist] no shard cursor for {self.world} rank(s) in the checkpoint: the data restarts "
                      "at epoch 0", flush=True)  # fmt: skip

    def resume(self) -> int | None:
        path = self.out_dir / CHECKPOINT_NAME
        if not (self.cfg.train.resume and path.is_file()):
            return None
        self.load(path)
        return self.step_num
