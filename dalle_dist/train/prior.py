"""The prior's trainer: one engine for one process and for pipeline stages × FSDP2 shards × replicas.

A plain process is the 1-rank topology (pp=1, replicate=1, shard=1) of the same engine (``runtime.py``); torchrun
starts the same class on every rank. Build order: ``parallel/parallelize.py``. One update, in phases:

1. forward-backward: the whole stage, or the pipeline schedule over microbatches (``_forward_backward``);
   the global loss is all-reduced at once, and a nonfinite loss stops the run on every rank together;
2. unscale and check: per-resblock scales divided out of the fp32 gradient shards in place, finite flags ANDed
   over the world, scales updated [P D.1, E.2(10)] (``_unscale_and_check``);
3. replica reduction: one fp32 all-reduce or PowerSGD over the ``replicate`` dim [P §2.5, E.2] (``_reduce``);
4. clip: the global norm over every stage and shard, clipped in place at ``optim.grad_clip`` [P B.2];
5. update: AdamW, the 16-bit weights rounded back to their grid (``_update``);
6. EMA of the applied updates [P B.2]; 7. metrics.

A nonfinite gradient anywhere skips 5 and 6 on every rank. The loss of every microbatch is normalised by the
global batch's token counts and multiplied by the data-parallel degree, so the averaging reductions (FSDP's
reduce-scatter, the replica all-reduce) give exactly the one-process gradient: every topology agrees.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import ConfigError, PriorRunConfig, to_dict
from ..models.prior import IGNORE_INDEX
from ..parallel.parallelize import apply_prior_fsdp, build_prior_parts
from ..parallel.pipeline import make_loss_fn, pack_targets
from ..parallel.powersgd import PowerSGDReducer
from ..parallel.topology import build_mesh
from ..precision import (
    REST,
    ResblockGradScaler,
    ShardedAdamW32,
    decay_groups,
    grads_by_block,
    round_to_storage_,
    sync_finite_flags,
)
from .checkpoint import rng_state, set_rng_state
from .dist_checkpoint import latest_checkpoint, load_distributed, save_distributed
from .ema import EMA
from .faults import install_faults
from .loop import LoopTrainer
from .metrics import throughput
from .prior_checks import check_prior_config
from .prior_data import PriorData
from .runtime import init_distributed
from .schedules import PlateauHalvingLR


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class PriorTrainer(LoopTrainer):
    """Prior training on a (pp, replicate, shard) mesh of any size. ``build()`` then ``step()``, or ``fit()``."""

    stage = "prior"
    cfg: PriorRunConfig

    def __init__(self, cfg: PriorRunConfig) -> None:
        self.topology = check_prior_config(cfg)
        super().__init__(cfg)
        self.schedule = PlateauHalvingLR.from_config(cfg.optim)

    @staticmethod
    def check_config(cfg: PriorRunConfig, world_size: int) -> None:
        check_prior_config(cfg, world_size)

    @property
    def run_name(self) -> str:
        return f"prior-{self.topology.describe()}"

    # ---- build ----------------------------------------------------------------------------------

    def build(self) -> PriorTrainer:
        cfg, topo = self.cfg, self.topology
        self.device, self._created_group = init_distributed(cfg.parallel.backend, cfg.train.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        topo.check(self.world)
        self.mesh = build_mesh(topo, self.device.type)
        self.pp_rank, self.rep_rank, self.shard_rank = topo.coords(self.rank)
        self.parts = build_prior_parts(cfg, topo, self.pp_rank, self.device)
        self.stages, self.stage_ids = self.parts.stages, self.parts.pipeline.stage_ids
        self.view, self.dtype = self.parts.view, self.parts.policy.dtype
        self.grad_scaler = self._build_scaler()
        apply_prior_fsdp(self.parts, topo, self.mesh["shard"])
        self.named = dict(self.view.named_parameters())  # one-process names → (sharded) parameters
        self.params = list(self.named.values())
        self.low_params = [self.named[n] for n in self.parts.policy.low_params]
        self.optimizer = self._build_optimizer()
        self.reducer = self._build_reducer()
        self.ema = EMA(self.view, cfg.optim.ema_decay, cfg.optim.ema_every)
        self.n_stages = topo.pp * cfg.parallel.virtual_stages
        self.data = PriorData(cfg, topo, topo.dp_rank(self.rank), self.device)
        if topo.pp > 1:
            par = cfg.parallel
            self.pipe_schedule = self.parts.pipeline.build_schedule(
                self.device, self.mesh["pp"].get_group(), par.n_microbatches, self._loss, par.schedule, par.pp_reshard
            )
        self._built = True
        return self

    def _build_scaler(self) -> ResblockGradScaler | None:
        """Per-resblock gradient scales (fp16) on this rank's resblocks, plus the test-only fault hook.

        The scaler holds every resblock key of the full model, so flags and scales agree on all ranks. M = 1: the
        loss is multiplied by dp_size (see ``_loss``), so each rank's gradient has the size of a per-replica mean;
        the paper's M·2^13 over the global batch is the same 2^13 × that gradient [P D.1, D.3]. The scales then do
        not depend on the topology and resume on any layout.
        """
        scaler = None
        if self.parts.policy.scaling == "per_resblock":
            scaler = ResblockGradScaler(list(self.parts.meta_model.resblocks), self.cfg.precision, replicas=1)
            scaler.attach(dict(self.view.resblocks.items()))
        fault = install_faults(self.view.resblocks, self.rank, lambda: self.step_num + 1)
        if fault is not None:
            print(f"[dalle_dist] test fault injection: {fault}", flush=True)
        return scaler

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW [P B.2]: torch's where nothing is rounded to 16 bits, ``ShardedAdamW32``'s arithmetic otherwise."""
        o, prec = self.cfg.optim, self.cfg.precision
        groups = [g for stage in self.stages for g in decay_groups(stage, o.weight_decay)]
        lr = self.schedule.lr_at(0)
        # With fp32 moments and no rounding to 16 bits, ShardedAdamW32's arithmetic is torch's AdamW on the fp32
        # storage, so torch's runs it, with its foreach kernels on plain tensors (shard = 1).
        if not self.low_params or (prec.master_weights and prec.moments_dtype == "fp32"):
            foreach = True if self.topology.shard == 1 else None
            return torch.optim.AdamW(groups, lr=lr, betas=o.betas, eps=o.eps, foreach=foreach)
        moments = torch.bfloat16 if prec.moments_dtype == "bf16" else torch.float32
        return ShardedAdamW32(groups, self.low_params, lr=lr, betas=o.betas, eps=o.eps, moments_dtype=moments)

    def _build_reducer(self) -> PowerSGDReducer | None:
        """PowerSGD over the replicate dim on each rank's gradient shards [P §2.5, E.2], when configured."""
        if self.cfg.comm.replica_reduce != "powersgd" or self.topology.replicate == 1:
            return None
        local = {n: _local(p) for n, p in self.named.items()}
        group = self.mesh["replicate"].get_group()
        # max_norm None: clipping needs the norm over every stage and shard (``_clip``).
        return PowerSGDReducer.from_config(
            local, self.cfg.comm, self.cfg.model.d_model, group, shards=self.topology.shard, max_norm=None
        )

    def _loss(self, output: tuple[Tensor, Tensor], target: Tensor) -> Tensor:
        n_text, n_image = self._counts
        scale = float(self.topology.dp_size)
        return make_loss_fn(self.cfg.model, n_text, n_image, scale=scale, parts=self._parts)(output, target)

    # ---- one update, in phases --------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        if not self._built:
            raise RuntimeError("call build() before step()")
        t0 = time.perf_counter()
        lr = self.schedule.lr_at(self.step_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = self._forward_backward(*self.data.batch(self.step_num))
        if not math.isfinite(losses[0]):  # the same all-reduced value on every rank: all stop together
            raise FloatingPointError(
                f"non-finite loss {losses[0]} at step {self.step_num}; lower --optim.lr or check the data"
            )
        comm: dict[str, float] = {}
        applied = self._unscale_and_check()  # False on every rank when any resblock overflowed anywhere
        if applied:
            comm = self._reduce()
            grad_norm = self._clip()
            applied = math.isfinite(grad_norm)  # any rank's nonfinite gradient makes the global norm nonfinite
        else:
            grad_norm = self._grad_norms()  # telemetry only: which resblocks were nonfinite, how large
        if applied:
            self._update()  # otherwise no parameter, moment or EMA changes, on every rank [P E.2(11)]
        self.step_num += 1  # counts batches: the data cursor and lr schedule advance over skipped updates too
        if applied:
            self.ema.update(self.view)  # counts applied updates: every optim.ema_every-th one is averaged
        return self._metrics(losses, lr, grad_norm, not applied, comm, time.perf_counter() - t0)

    def _forward_backward(self, text: Tensor, image: Tensor) -> list[float]:
        """Forward and backward of this rank's share; returns the global (loss, text CE, image CE)."""
        topo = self.topology
        text_targets = self.parts.meta_model.targets(text)  # uses the config only
        counts = torch.stack([(text_targets != IGNORE_INDEX).sum(), torch.tensor(image.numel(), device=self.device)])
        dist.all_reduce(counts)  # over the world: every pp stage counted its replica's slice once
        counts = counts // topo.pp
        self._counts = (counts[0].float(), counts[1].float())
        self._parts: list[Tensor] = []
        target = pack_targets(text_targets, image)
        for stage in self.stages:
            stage.train()
        self.optimizer.zero_grad(set_to_none=True)
        local_loss = torch.zeros((), device=self.device)
        if topo.pp == 1:
            loss = self._loss(self.stages[0](text, image), target)
            loss.backward()
            local_loss = loss.detach() / topo.dp_size
        else:
            losses: list[Tensor] = []
            has_last = self.n_stages - 1 in self.stage_ids
            args = (text, image) if 0 in self.stage_ids else ()
            kwargs: dict[str, Any] = {"target": target, "losses": losses} if has_last else {}
            self.pipe_schedule.step(*args, **kwargs)
            if has_last:
                local_loss = torch.stack([x.detach() for x in losses]).sum() / topo.dp_size
        # On its first step the pipeline schedule infers shapes by running the loss once on placeholder tensors;
        # only the last n_microbatches entries are this step's real microbatches.
        real = self._parts[-self.cfg.parallel.n_microbatches :] if topo.pp > 1 else self._parts
        parts = torch.stack(real).sum(0) if real else torch.zeros(2, device=self.device)
        totals = torch.cat([local_loss.reshape(1), parts])  # (3,): loss, text CE, image CE
        dist.all_reduce(totals)  # only last-stage ranks hold losses; their sum is the global-batch value
        return [float(x) for x in totals]

    def _unscale_and_check(self) -> bool:
        """Divide out the per-resblock scales in place (fp32), AND the finite flags over the world, update scales.

        Every rank ends with the same flags, so all skip together and their scales stay equal [P D.1, E.2(10)].
        Always True without a scaler: then the global norm decides.
        """
        if self.grad_scaler is None:
            return True
        flags, filtered = self.grad_scaler.unscale_(grads_by_block(self.named.items()))
        flags = sync_finite_flags(flags)  # over the whole world: every stage, shard and replica
        keys = self.grad_scaler.keys
        counts = torch.tensor([filtered[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)  # activation-gradient values the filters zeroed, summed over every rank
        self._filtered = dict(zip(keys, (int(c) for c in counts.tolist())))
        return self.grad_scaler.update(flags)  # ÷√2 only for the offending resblocks [P D.1]

    def _reduce(self) -> dict[str, float]:
        """Average the gradient shards over the replicate dim: PowerSGD or one fp32 all-reduce."""
        if self.topology.replicate == 1:
            return {}
        grads = {n: _local(p.grad) for n, p in self.named.items() if p.grad is not None}
        if self.reducer is not None:
            result = self.reducer.reduce(grads)
            result.copy_into(grads)
            if not result.finite:
                for g in grads.values():
                    g.fill_(float("nan"))  # makes the global norm nonfinite on every rank → the step is skipped
            return {"comm_bytes": float(result.bytes_sent["sent"]),
                    "comm_bytes_uncompressed": float(result.bytes_sent["uncompressed"])}  # fmt: skip
        flat = torch.cat([g.reshape(-1).float() for g in grads.values()])
        dist.all_reduce(flat, group=self.mesh["replicate"].get_group())
        flat /= self.topology.replicate
        offset = 0
        for g in grads.values():
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        nbytes = float(flat.numel() * flat.element_size())
        return {"comm_bytes": nbytes, "comm_bytes_uncompressed": nbytes}

    def _grad_norms(self) -> float:
        """Global gradient norm over every stage and shard (replicas hold equal copies), summed per resblock in one
        all-reduce, so the per-resblock norms of the unscaled gradients come free for the scaler's telemetry."""
        grads = grads_by_block(self.named.items())
        keys = [*self.grad_scaler.keys, REST] if self.grad_scaler is not None else sorted(grads)
        sq = torch.zeros(len(keys), device=self.device, dtype=torch.float64)
        for i, key in enumerate(keys):
            for g in grads.get(key, []):
                sq[i] += g.double().pow(2).sum()
        dist.all_reduce(sq)
        sq /= self.topology.replicate
        if self.grad_scaler is not None:
            self.grad_scaler.record(self._filtered, dict(zip(keys, (math.sqrt(v) for v in sq.tolist()))))
        return math.sqrt(float(sq.sum()))

    def _clip(self) -> float:
        """Global gradient norm; gradients multiplied in place by max_norm / norm when above it [P B.2]."""
        norm, max_norm = self._grad_norms(), self.cfg.optim.grad_clip
        coef = max_norm / (norm + 1e-6)  # the formula of torch.nn.utils.clip_grad_norm_
        if max_norm > 0 and math.isfinite(norm) and coef < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    def _update(self) -> None:
        self.optimizer.step()
        if self.low_params and not self.cfg.precision.master_weights:
            round_to_storage_((_local(p) for p in self.low_params), self.dtype)  # the 16-bit storage [P §2.4]

    def _metrics(
        self, losses: list[float], lr: float, grad_norm: float, skipped: bool, comm: dict[str, float], seconds: float
    ) -> dict[str, float]:
        cfg = self.cfg
        out = {"step": self.step_num, "loss": losses[0], "loss_text": losses[1], "loss_image": losses[2], "lr": lr,
               "grad_norm": grad_norm, "skipped": float(skipped), "step_seconds": seconds, **comm}  # fmt: skip
        if self.grad_scaler is not None:
            out.update(self.grad_scaler.telemetry())
        if self.schedule.observe(self.step_num, losses[0]):
            out["lr_halved"] = float(self.schedule.halvings)
        out.update(throughput(cfg.model, cfg.data.batch_size, seconds, self.world, cfg.train.peak_flops))
        return out

    # ---- checkpoints, the loop --------------------------------------------------------------------

    def save(self) -> Path:
        """Collective: a complete ``checkpoints/step_N`` directory (atomic rename), the last N kept."""
        state = {
            "stage": "prior", "step": self.step_num, "schedule": self.schedule.state_dict(),
            "config": to_dict(self.cfg),
            "topology": self.topology.describe(), "ema_calls": self.ema.calls, "data": self.data.state(),
            "precision": {"grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None},
        }  # fmt: skip
        files = self.data.rank_files(self.pp_rank)
        if self.reducer is not None:
            errors = self.reducer.state_dict()  # collective over the replicas: Σ of their error buffers
            if self.rep_rank == 0:
                files[self._powersgd_file()] = errors
        return save_distributed(
            self.out_dir, self.step_num, self.view, self.optimizer, self.ema.shadow, state, rng_state({}),
            keep=self.cfg.train.keep_checkpoints, rank_files=files,
        )  # fmt: skip

    def _powersgd_file(self) -> str:
        """Error sums belong to one (stage, shard) slot of the layout; they only load back into the same layout."""
        t = self.topology
        return f"powersgd_pp{self.pp_rank}of{t.pp}_shard{self.shard_rank}of{t.shard}.pt"

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint written on any topology (DCP reshards on load)."""
        path = Path(path)
        if not (path / "trainer.pt").is_file():
            raise ValueError(f"{path} is not a prior checkpoint: expected a complete checkpoints/step_N directory")
        if torch.load(path / "trainer.pt", weights_only=True).get("stage") != "prior":
            raise ValueError(f"{path} is not a prior checkpoint")
        state, rng = load_distributed(path, self.view, self.optimizer, self.ema.shadow)
        self.step_num = int(state["step"])
        self.schedule.load_state_dict(state["schedule"])
        every = max(1, self.cfg.optim.ema_every)  # checkpoints before ema_calls counted steps
        self.ema.calls = int(state.get("ema_calls", self.step_num - self.step_num % every))
        self._load_scaler(path, (state.get("precision") or {}).get("grad_scaler"))
        if rng is not None:
            set_rng_state(rng, {})
        self.data.load(path, state.get("data") or {}, announce=self.is_main)
        if self.reducer is not None:
            file = path / self._powersgd_file()
            if file.is_file():
                self.reducer.load_state_dict(torch.load(file, weights_only=True))
            elif self.is_main:
                # Another pp/shard layout: the shard matrices differ, so the residuals cannot be mapped; PowerSGD
                # restarts from zero error buffers (what the paper avoided on same-layout restarts [P E.2 notes]).
                print("[dalle_dist] PowerSGD error buffers not restored (checkpoint from another layout)", flush=True)

    def _load_scaler(self, path: Path, saved: dict[str, Any] | None) -> None:
        if self.grad_scaler is None:
            return
        if saved is None:
            raise ValueError(
                f"{path} has no grad-scaler state but this run scales per resblock (precision.dtype=fp16): resume "
                "with the checkpoint's precision settings, or start over with --train.resume false"
            )
        self.grad_scaler.load_state_dict(saved)  # the same on every rank; M = 1 on every topology

    def resume(self) -> int | None:
        """Load the latest complete checkpoint in ``train.out_dir`` (if resuming); returns its step or None."""
        if not self.cfg.train.resume:
            return None
        latest = latest_checkpoint(self.out_dir)
        if latest is None:
            legacy = self.out_dir / "checkpoint.pt"
            if legacy.is_file():
                raise ConfigError(
                    f"{legacy} was written by the one-process prior trainer of an older dalle_dist; this version "
                    f"resumes from {self.out_dir}/checkpoints/step_N directories. Convert it with: dalle-dist "
                    f"convert-checkpoint {legacy}  (or start over with --train.resume false)"
                )
            return None
        self.load(latest)
        if self.is_main:
            print(f"[dalle_dist] resumed from {latest} at step {self.step_num}", flush=True)
        return self.step_num
