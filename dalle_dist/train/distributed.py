"""The prior's distributed trainer: pipeline stages × FSDP2 shards × replicas on one DeviceMesh.

Composition order (each step applied from outside to a single-device model, as torchtitan does):

1. build the whole prior on the meta device (no memory), drawing its init seed from ``train.seed``;
2. cut this pp rank's stage modules out of it (``parallel/pipeline.py``), materialise them and initialise by
   parameter name, so every topology starts from the single-process weights;
3. numerics per stage (``dist_precision.py``): 16-bit values and autocast, activation checkpointing, the
   per-resblock gradient scaler's hooks on this rank's resblocks [P §2.4, D.1];
4. FSDP2 ``fully_shard`` per resblock (and per 16-bit Linear), then per stage, on the ``shard`` mesh dim [P Fig. 5];
5. wrap the stages in ``PipelineStage`` objects and a schedule when pp > 1;
6. after backward: unscale the fp32 gradient shards and AND the finite flags over the world (fp16), reduce over the
   ``replicate`` dim (all-reduce or PowerSGD), global-norm clip over all stages and shards, AdamW; a skip is
   decided on every rank together.

Data: random batches, or token shards read per data-parallel rank (``data.source=tokens``; every pp stage of a
replica reads the same stream), with one cursor file per dp rank in the checkpoint.

The loss of every microbatch is normalised by the global batch's token counts and multiplied by the
data-parallel degree, so the averaging reductions (FSDP's reduce-scatter, the replica all-reduce) produce
exactly the gradient of the single-process loss: runs on any topology agree with one process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from ..config import ConfigError, PriorRunConfig, to_dict
from ..data.pipeline import ShardLoader, token_loader
from ..data.random_batches import random_tokens
from ..data.shards import ShardError, expand_shards
from ..models.prior import IGNORE_INDEX, DallePrior, init_prior_parameters
from ..parallel.fsdp import apply_fsdp
from ..parallel.pipeline import SCHEDULES, apply_pipeline, make_loss_fn, pack_targets
from ..parallel.pipeline import PriorStage as PipelineStageModule
from ..parallel.powersgd import PowerSGDReducer
from ..parallel.topology import Topology, build_mesh
from ..precision import REST, sync_finite_flags
from .checkpoint import rng_state, set_rng_state
from .dist_checkpoint import latest_checkpoint, load_distributed, save_distributed
from .dist_precision import (
    ShardedAdamW32,
    ShardedResblockGradScaler,
    prepare_stage,
    round_to_storage_,
)
from .faults import install_faults
from .metrics import MetricsLogger, throughput
from .schedules import PlateauHalvingLR
from .stages import PriorTrainer, build_tokenizer
from .trainer import decay_groups


class StageView(nn.Module):
    """This rank's stages seen as one module with the single-process names (``embed``, ``resblocks.K``, ``head``).

    Checkpoints and EMA key tensors by these names, so they load on any topology. Holds references only.
    """

    def __init__(self, stages: list[PipelineStageModule]) -> None:
        super().__init__()
        self.embed = next((s.embed for s in stages if s.embed is not None), None)
        self.resblocks = nn.ModuleDict({k: b for s in stages for k, b in s.resblocks.items()})
        self.head = next((s.head for s in stages if s.head is not None), None)


def validate_parallel(cfg: PriorRunConfig, world_size: int | None = None) -> Topology:
    """Every check that can fail without a process group, with the fix in the message."""
    par = cfg.parallel
    topo = Topology.parse(par.topology)
    if world_size is not None:
        topo.check(world_size)
    if par.schedule not in SCHEDULES:
        raise ConfigError(f"parallel.schedule={par.schedule!r}: choose one of {list(SCHEDULES)}")
    if par.virtual_stages < 1 or (par.virtual_stages > 1 and par.schedule != "interleaved1f1b"):
        raise ConfigError("parallel.virtual_stages > 1 needs parallel.schedule=interleaved1f1b")
    n_chunks = topo.pp * par.virtual_stages
    n_blocks = 2 * cfg.model.n_layers
    if n_chunks > n_blocks:
        raise ConfigError(
            f"pp={topo.pp} × virtual_stages={par.virtual_stages} = {n_chunks} stages but the model has only "
            f"{n_blocks} resblocks; lower parallel.topology pp or parallel.virtual_stages"
        )
    batch = cfg.data.batch_size
    if batch % topo.dp_size:
        raise ConfigError(
            f"data.batch_size={batch} is the global batch and must divide evenly over replicate × shard = "
            f"{topo.dp_size} data-parallel ranks; e.g. --data.batch_size {topo.dp_size * max(1, batch // topo.dp_size)}"
        )
    local = batch // topo.dp_size
    if topo.pp > 1 and local % par.n_microbatches:
        raise ConfigError(
            f"the per-rank batch {local} (data.batch_size / dp) does not split into parallel.n_microbatches="
            f"{par.n_microbatches}; pick a divisor of {local}"
        )
    if topo.pp > 1 and par.schedule == "1f1b" and par.n_microbatches < topo.pp:
        raise ConfigError(f"1F1B needs parallel.n_microbatches >= pp ({topo.pp}) to fill the pipeline")
    _validate_data(cfg, topo)
    return topo


def _validate_data(cfg: PriorRunConfig, topo: Topology) -> None:
    """The engine reads ``random`` batches or pretokenized shards (``tokens``), split over the dp ranks only."""
    data = cfg.data
    if data.source == "random":
        return
    if data.source != "tokens":
        raise ConfigError(
            f"the distributed prior trainer reads data.source=random or tokens, not {data.source!r}: turn images into "
            "token shards with dalle-dist pretokenize --shards SHARDS --dvae DVAE_CKPT --out DIR, then train with "
            "--data.source tokens --data.shards DIR"
        )
    try:
        n_shards = len(expand_shards(data.shards))
    except ShardError as err:
        raise ConfigError(f"data.shards: {err}") from None
    readers = topo.dp_size * max(1, data.num_workers)
    if n_shards < readers:
        raise ConfigError(
            f"{n_shards} token shard(s) cannot feed replicate × shard = {topo.dp_size} data-parallel ranks × "
            f"{max(1, data.num_workers)} loader reader(s) = {readers} readers (each needs at least one shard): "
            "pretokenize with a smaller --shard-size or lower data.num_workers"
        )


def init_distributed(backend: str = "auto") -> torch.device:
    """Join the torchrun job (env:// rendezvous) and pick this rank's device."""
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class DistributedPriorTrainer:
    """Prior training on a (pp, replicate, shard) mesh. ``build()`` then ``step()``; rank 0 reports."""

    def __init__(self, cfg: PriorRunConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.topology = validate_parallel(cfg)
        self.schedule = PlateauHalvingLR.from_config(cfg.optim)
        self.step_num = 0

    # ---- build ----------------------------------------------------------------------------------

    def build(self) -> DistributedPriorTrainer:
        cfg, par = self.cfg, self.cfg.parallel
        self.device = init_distributed(par.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.topology.check(self.world)
        self.mesh = build_mesh(self.topology, self.device.type)
        self.pp_rank, self.rep_rank, self.shard_rank = self.topology.coords(self.rank)
        self.dp_rank = self.topology.dp_rank(self.rank)

        torch.manual_seed(cfg.train.seed)
        with torch.device("meta"):
            self.meta_model = DallePrior(cfg.model)
        self.parts = apply_pipeline(self.meta_model, self.pp_rank, self.topology.pp, par.virtual_stages)
        self.stages, self.stage_ids = self.parts.stages, self.parts.stage_ids
        for stage in self.stages:
            stage.to_empty(device=self.device)
            init_prior_parameters(stage.named_parameters(), cfg.model, self.meta_model.init_seed)
        self.view = StageView(self.stages)  # references only: stays valid through FSDP's in-place wrapping
        self._build_numerics()
        if self.topology.shard > 1:
            apply_fsdp(self.stages, self.mesh["shard"], self.low_names, self.dtype)
        self.params = [p for stage in self.stages for p in stage.parameters()]
        self.named = dict(self.view.named_parameters())  # full single-process names → (sharded) parameters
        self.key_params = self._params_by_key()
        # 16-bit parameters (fp32 storage, see dist_precision): rounded back to the 16-bit grid after each update.
        self.low_params = [self.named[n] for n in self.low_names]
        self.optimizer = self._build_optimizer()
        self.reducer = self._build_reducer()
        self.ema = {
            k: v.detach().to(torch.float32, copy=True)
            for k, v in self.view.state_dict().items()
            if v.is_floating_point()
        }
        self.n_stages = self.topology.pp * par.virtual_stages
        self._counts: tuple[Tensor, Tensor] | None = None
        self.loader = self._build_loader()
        if self.topology.pp > 1:
            self._build_pipeline()
        return self

    def _build_numerics(self) -> None:
        """16-bit values and autocast per stage, activation checkpointing, per-resblock gradient scales.

        Runs before FSDP (the policies are set on plain modules; FSDP keeps their forward wrappers and hooks).
        The scaler holds every resblock key of the full model, so flags and scales agree on all ranks.
        """
        prec = self.cfg.precision
        policies = [prepare_stage(stage, prec) for stage in self.stages]
        self.dtype = policies[0].dtype
        self.low_names = [n for policy in policies for n in policy.low_params]
        self.scaler: ShardedResblockGradScaler | None = None
        if policies[0].scaling == "per_resblock":
            # M = 1: the loss is already multiplied by dp_size (see _loss), so each rank's gradient has the size of
            # a per-replica mean; the paper's M·2^13 with a loss over the global batch is the same 2^13 × that
            # gradient [P D.1, D.3]. The scales then do not depend on the topology, and resume on any layout.
            self.scaler = ShardedResblockGradScaler(list(self.meta_model.resblocks), prec, replicas=1)
            self.scaler.attach_local(self.view.resblocks)
        fault = install_faults(self.view.resblocks, self.rank, lambda: self.step_num + 1)
        if fault is not None:
            print(f"[dalle_dist] test fault injection: {fault}", flush=True)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW [P B.2]: torch's in fp32 runs, ``AdamW32``'s arithmetic (fp32 or bf16 moments) in 16-bit ones."""
        o = self.cfg.optim
        groups = [g for stage in self.stages for g in decay_groups(stage, o.weight_decay)]
        prec = self.cfg.precision
        # With fp32 moments and no rounding to 16 bits, ShardedAdamW32's arithmetic is torch's AdamW on the fp32
        # storage, so torch's runs it, with its foreach kernels on plain tensors (shard = 1; torch's CPU default
        # is the per-parameter loop). This is also what plan_dry_run's "engine" storage assumes.
        if not self.low_params or (prec.master_weights and prec.moments_dtype == "fp32"):
            foreach = True if self.topology.shard == 1 else None
            return torch.optim.AdamW(groups, lr=self.schedule.lr_at(0), betas=o.betas, eps=o.eps, foreach=foreach)
        moments = torch.bfloat16 if prec.moments_dtype == "bf16" else torch.float32
        return ShardedAdamW32(groups, self.low_params, lr=self.schedule.lr_at(0), betas=o.betas, eps=o.eps,
                              moments_dtype=moments)  # fmt: skip

    def _params_by_key(self) -> dict[str, list[nn.Parameter]]:
        """This rank's parameters grouped by resblock key (``resblocks.K.*`` → K) and ``REST`` (embed, head)."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, p in self.named.items():
            key = name.split(".")[1] if name.startswith("resblocks.") else REST
            groups.setdefault(key, []).append(p)
        return groups

    def _build_reducer(self) -> PowerSGDReducer | None:
        """PowerSGD over the replicate dim on each rank's gradient shards [P §2.5, E.2], when configured."""
        if self.cfg.comm.replica_reduce != "powersgd" or self.topology.replicate == 1:
            return None
        local = {n: self._local(p) for n, p in self.named.items()}
        return PowerSGDReducer.from_config(
            local,
            self.cfg.comm,
            self.cfg.model.d_model,
            self.mesh["replicate"].get_group(),
            shards=self.topology.shard,
            max_norm=None,  # clipping needs the norm over every stage and shard: done in _clip_
        )

    @staticmethod
    def _local(t: Tensor) -> Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    def _build_pipeline(self) -> None:
        self.pipe_schedule = self.parts.build_schedule(
            self.device, self.mesh["pp"].get_group(), self.cfg.parallel.n_microbatches, self._loss,
            self.cfg.parallel.schedule,
        )  # fmt: skip

    def _loss(self, output: tuple[Tensor, Tensor], target: Tensor) -> Tensor:
        assert self._counts is not None
        n_text, n_image = self._counts
        scale = float(self.topology.dp_size)
        return make_loss_fn(self.cfg.model, n_text, n_image, scale=scale, parts=self._parts)(output, target)

    # ---- data -----------------------------------------------------------------------------------

    def _build_loader(self) -> ShardLoader | None:
        """Token shards for this rank's dp coordinate (``data.source=tokens``); None for random batches.

        Only the dp ranks (replicate × shard) split the shards; every pp stage of a replica builds its own loader
        for the same dp rank, so all stages read the same samples in the same order (each stage reads its own
        copy of the stream: cheap, since tokens need no decoding, and no broadcast between stages is needed).
        ``data.batch_size`` is the global batch here; each loader makes batches of batch_size / dp_size.
        """
        data, m = self.cfg.data, self.cfg.model
        if data.source != "tokens":
            return None
        PriorTrainer._check_token_grid(self)  # type: ignore[arg-type]  # reads self.cfg only
        per_rank = dataclasses.replace(data, batch_size=data.batch_size // self.topology.dp_size)
        tokenizer = build_tokenizer(data, m.text_vocab)
        return token_loader(
            per_rank, tokenizer, m.caption_len, m.grid, m.image_vocab, m.text_pad_id,
            dp_rank=self.dp_rank, dp_size=self.topology.dp_size,
        )  # fmt: skip

    def _data_file(self, dp_size: int | None = None) -> str:
        return f"data_dp{self.dp_rank}of{dp_size or self.topology.dp_size}.pt"

    def _load_data_state(self, path: Path) -> None:
        """Restore this dp rank's cursor; on another dp layout (or loader count) restart the epoch it was in."""
        assert self.loader is not None
        file = path / self._data_file()
        reason = ""
        if file.is_file():
            try:
                self.loader.load_state_dict(torch.load(file, weights_only=True))
                return
            except ValueError as err:  # saved with another data.num_workers
                reason = str(err)
        saved = [torch.load(f, weights_only=True) for f in sorted(path.glob("data_dp*of*.pt"))]
        # The shard split depends on dp_size × readers, so old cursors cannot be mapped onto the new readers.
        # Restarting at the beginning of the earliest epoch any old reader was in skips nothing of that epoch
        # (some of its samples are seen twice) and keeps the epoch count, hence the shard permutation, moving on.
        epoch = min((int(c["epoch"]) for st in saved for c in st["cursors"]), default=0)
        loader = self.loader
        loader.load_state_dict({
            "format": 1, "dp_rank": loader.dp_rank, "dp_size": loader.dp_size, "num_readers": loader.num_readers,
            "cursors": [{"epoch": epoch, "shard_index": 0, "sample_offset": 0}] * loader.num_readers,
            "next_reader": 0, "skipped": {}, "counted": {},
        })  # fmt: skip
        if self.rank == 0:
            why = reason or (
                f"the checkpoint's data cursors are for another data-parallel layout ({len(saved)} file(s), this "
                f"run has dp={self.topology.dp_size})"
                if saved
                else "the checkpoint holds no data cursor"
            )
            print(f"[dalle_dist] warning: {why}; the token stream restarts at the start of epoch {epoch}", flush=True)

    def global_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The step's global batch; every rank draws it whole and keeps its data-parallel slice."""
        data, m = self.cfg.data, self.cfg.model
        return random_tokens(data.batch_size, m.caption_len, m.text_vocab, m.image_len, m.image_vocab, data.seed, step)

    def local_batch(self, step: int) -> tuple[Tensor, Tensor]:
        if self.loader is not None:
            batch = self.loader.next_batch()  # this dp rank's share of the global batch
            return batch["text"].to(self.device), batch["image"].to(self.device)  # (B/dp, Lc), (B/dp, g²)
        text, image = self.global_batch(step)
        per = self.cfg.data.batch_size // self.topology.dp_size
        sl = slice(self.dp_rank * per, (self.dp_rank + 1) * per)
        return text[sl].to(self.device), image[sl].to(self.device)

    # ---- one update -----------------------------------------------------------------------------

    def _local_grad(self, p: nn.Parameter) -> Tensor | None:
        return None if p.grad is None else self._local(p.grad)

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        cfg, topo = self.cfg, self.topology
        lr = self.schedule.lr_at(self.step_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        text, image = self.local_batch(self.step_num)
        text_targets = self.meta_model.targets(text)  # uses the config only
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
            out = self.stages[0](text, image)
            loss = self._loss(out, target)
            loss.backward()
            local_loss = loss.detach() / topo.dp_size
        else:
            losses: list[Tensor] = []
            has_first = 0 in self.stage_ids
            has_last = self.n_stages - 1 in self.stage_ids
            args = (text, image) if has_first else ()
            kwargs: dict[str, Any] = {"target": target, "losses": losses} if has_last else {}
            self.pipe_schedule.step(*args, **kwargs)
            if has_last:
                local_loss = torch.stack([x.detach() for x in losses]).sum() / topo.dp_size

        comm_metrics: dict[str, float] = {}
        applied = self._unscale_and_check()  # False on every rank when any resblock overflowed anywhere
        if applied:
            comm_metrics = self._reduce_replicas()
            grad_norm = self._clip_(cfg.optim.grad_clip)
            applied = math.isfinite(grad_norm)  # any rank's nonfinite gradient makes the global norm nonfinite
        else:
            grad_norm = self._grad_norms()  # for the telemetry only: which resblocks were nonfinite, how large
        if applied:
            self.optimizer.step()  # otherwise skip the parameter and moment update on every rank [P E.2(11)]
            if self.low_params and not cfg.precision.master_weights:
                # The single-process trainer computes the update in fp32 and rounds it into the 16-bit weight.
                round_to_storage_((self._local(p) for p in self.low_params), self.dtype)
        skipped = not applied
        numerics = self.scaler.telemetry() if self.scaler is not None else {}
        self.step_num += 1
        if applied and self.step_num % cfg.optim.ema_every == 0:
            self._update_ema(cfg.optim.ema_decay)  # a skipped update leaves the average unchanged too

        # On its first step the pipeline schedule infers shapes by running the loss once on placeholder tensors;
        # only the last n_microbatches entries are this step's real microbatches.
        real = self._parts[-cfg.parallel.n_microbatches :] if topo.pp > 1 else self._parts
        parts = torch.stack(real).sum(0) if real else torch.zeros(2, device=self.device)
        totals = torch.cat([local_loss.reshape(1), parts])  # (3,): loss, text CE, image CE
        dist.all_reduce(totals)  # only last-stage ranks hold losses; their sum is the global-batch value
        loss_value, loss_text, loss_image = (float(x) for x in totals)
        self.schedule.observe(self.step_num, loss_value)
        seconds = time.perf_counter() - t0
        metrics = {
            "step": self.step_num,
            "loss": loss_value,
            "loss_text": loss_text,
            "loss_image": loss_image,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": float(skipped),
            "step_seconds": seconds,
            **comm_metrics,
            **numerics,
        }
        metrics.update(throughput(cfg.model, cfg.data.batch_size, seconds, self.world, cfg.train.peak_flops))
        return metrics

    def _unscale_and_check(self) -> bool:
        """Per-resblock scaling: unscale the local fp32 gradient shards, AND the finite flags over the world.

        Every rank ends with the same flags, so all skip together and their scales stay equal [P D.1, E.2(10)].
        Returns whether the update may go on (always True without a scaler: then the global norm decides).
        """
        if self.scaler is None:
            return True
        grads = {k: [g for p in ps if (g := self._local_grad(p)) is not None] for k, ps in self.key_params.items()}
        flags, filtered = self.scaler.unscale_local_(grads)
        flags = sync_finite_flags(flags)  # over the whole world: every stage, shard and replica
        counts = torch.tensor([filtered[k] for k in self.scaler.keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)  # activation-gradient values the filters zeroed, summed over every rank
        self._filtered_counts = dict(zip(self.scaler.keys, (int(c) for c in counts.tolist())))
        return self.scaler.update(flags)  # ÷√2 only for the offending resblocks [P D.1]

    def _reduce_replicas(self) -> dict[str, float]:
        """Average the gradient shards over the replicate dim: PowerSGD or one fp32 all-reduce."""
        if self.topology.replicate == 1:
            return {}
        if self.reducer is not None:
            grads = {n: g for n, g in ((n, self._local_grad(p)) for n, p in self.named.items()) if g is not None}
            result = self.reducer.reduce(grads)
            result.copy_into(grads)
            if not result.finite:
                for g in grads.values():
                    g.fill_(float("nan"))  # makes the global norm nonfinite on every rank → the step is skipped
            return {"comm_bytes": float(result.bytes_sent["sent"]),
                    "comm_bytes_uncompressed": float(result.bytes_sent["uncompressed"])}  # fmt: skip
        group = self.mesh["replicate"].get_group()
        grads = [g for g in (self._local_grad(p) for p in self.params) if g is not None]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= self.topology.replicate
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
        nbytes = float(flat.numel() * flat.element_size())
        return {"comm_bytes": nbytes, "comm_bytes_uncompressed": nbytes}

    def _grad_norms(self) -> float:
        """Global gradient norm over every stage and shard (replicas hold equal copies).

        The squares are summed per resblock (and for the rest) in one all-reduce, so the per-resblock norms of the
        unscaled gradients come for free for the scaler's telemetry.
        """
        keys = [*self.scaler.keys, REST] if self.scaler is not None else sorted(self.key_params)
        sq = torch.zeros(len(keys), device=self.device, dtype=torch.float64)
        for i, key in enumerate(keys):
            for p in self.key_params.get(key, []):
                g = self._local_grad(p)
                if g is not None:
                    sq[i] += g.double().pow(2).sum()
        dist.all_reduce(sq)
        sq /= self.topology.replicate
        if self.scaler is not None:
            self.scaler.record(self._filtered_counts, dict(zip(keys, (math.sqrt(v) for v in sq.tolist()))))
        return math.sqrt(float(sq.sum()))

    def _clip_(self, max_norm: float) -> float:
        """Global gradient norm (:meth:`_grad_norms`); clip in place at ``max_norm`` [P B.2]."""
        norm = self._grad_norms()
        coef = max_norm / (norm + 1e-6)  # the formula of torch.nn.utils.clip_grad_norm_
        if max_norm > 0 and math.isfinite(norm) and coef < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    @torch.no_grad()
    def _update_ema(self, decay: float) -> None:
        """EMA of the parameters [P B.2], on each rank's own shards (DTensors), in fp32."""
        for k, v in self.view.state_dict().items():
            if k in self.ema:
                self.ema[k].lerp_(v.detach().to(torch.float32), 1.0 - decay)

    # ---- checkpoints and the loop -----------------------------------------------------------------

    def save(self) -> Path:
        trainer_state = {
            "stage": "prior",
            "step": self.step_num,
            "schedule": self.schedule.state_dict(),
            "config": to_dict(self.cfg),
            "topology": self.topology.describe(),
            "precision": {"grad_scaler": self.scaler.state_dict() if self.scaler is not None else None},
        }
        rank_files: dict[str, Any] = {}
        if self.reducer is not None:
            state = self.reducer.state_dict()  # collective over the replicas: Σ of their error buffers
            if self.rep_rank == 0:
                rank_files[self._powersgd_file()] = state
        if self.loader is not None and self.pp_rank == 0:  # every pp stage of a dp rank holds the same cursor
            rank_files[self._data_file()] = self.loader.state_dict()
        return save_distributed(
            self.cfg.train.out_dir,
            self.step_num,
            self.view,
            self.optimizer,
            self.ema,
            trainer_state,
            rng_state({}),
            keep=self.cfg.train.keep_checkpoints,
            rank_files=rank_files,
        )

    def _powersgd_file(self) -> str:
        """Error sums belong to one (stage, shard) slot of the layout; they only load back into the same layout."""
        t = self.topology
        return f"powersgd_pp{self.pp_rank}of{t.pp}_shard{self.shard_rank}of{t.shard}.pt"

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint written on any topology (DCP reshards on load)."""
        trainer_state, rng = load_distributed(path, self.view, self.optimizer, self.ema)
        if trainer_state.get("stage") != "prior":
            raise ValueError(f"{path} is not a prior checkpoint")
        self.step_num = int(trainer_state["step"])
        self.schedule.load_state_dict(trainer_state["schedule"])
        if self.scaler is not None:
            saved = (trainer_state.get("precision") or {}).get("grad_scaler")
            if saved is None:
                raise ValueError(
                    f"{path} has no grad-scaler state but this run scales per resblock (precision.dtype=fp16): resume "
                    "with the checkpoint's precision settings, or start over with --train.resume false"
                )
            self.scaler.load_state_dict(saved)  # the same on every rank; M = 1 on every topology
        if rng is not None:
            set_rng_state(rng, {})
        if self.loader is not None:
            self._load_data_state(Path(path))
        if self.reducer is not None:
            file = Path(path) / self._powersgd_file()
            if file.is_file():
                self.reducer.load_state_dict(torch.load(file, weights_only=True))
            elif self.rank == 0:
                # Another pp/shard layout: the shard matrices differ, so the residuals cannot be mapped; PowerSGD
                # restarts from zero error buffers (what the paper avoided on same-layout restarts [P E.2 notes]).
                print("[dalle_dist] PowerSGD error buffers not restored (checkpoint from another layout)", flush=True)

    def fit(self) -> list[dict[str, float]]:
        """Resume from the latest complete checkpoint, then train to ``train.steps``; rank 0 logs."""
        cfg = self.cfg
        latest = latest_checkpoint(cfg.train.out_dir) if cfg.train.resume else None
        if latest is not None:
            self.load(latest)
            if self.rank == 0:
                print(f"[dalle_dist] resumed from {latest} at step {self.step_num}", flush=True)
        out = Path(cfg.train.out_dir)
        history: list[dict[str, float]] = []
        log = None
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
            log = MetricsLogger(out, to_dict(cfg), cfg.train.wandb, name=f"prior-{self.topology.describe()}")
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.step_num,
            desc=f"train prior [{self.topology.describe()}]",
            disable=self.rank != 0 or not cfg.train.progress,
            dynamic_ncols=True,
        )
        try:
            while self.step_num < cfg.train.steps:
                metrics = self.step()
                history.append(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                every = cfg.train.log_every
                if log is not None and every > 0 and (self.step_num % every == 0 or self.step_num == cfg.train.steps):
                    log.log(metrics)
                if cfg.train.save_every > 0 and self.step_num % cfg.train.save_every == 0:
                    self.save()
            if latest is None or self.step_num > int(latest.name.split("_")[1]):
                self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        return history

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
