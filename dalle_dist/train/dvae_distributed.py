"""The dVAE, data-parallel: every rank a replica [P A.2: 64 GPUs, per-GPU batch 8, total 512].

The single-process :class:`DVAETrainer` with three changes: ``data.batch_size`` is the global batch and each rank
takes its slice; the model is wrapped in DDP whose comm hook SUMS gradients (the trainer divides the loss by the
replica count M [P D.3], so the sum is the global-batch mean); rank 0 alone logs and writes ``checkpoint.pt``
(the same single-file format as one process, so ``load_dvae``, export and resume work unchanged). The Gumbel
noise generator is reseeded from (rank, step) every step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError, DVAERunConfig
from ..data.pipeline import image_loader
from ..data.random_batches import random_images
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import init_distributed
from .stages import DVAETrainer


def validate_dvae_parallel(cfg: DVAERunConfig, world_size: int) -> None:
    """Checks that need no process group: the global batch must split evenly over the ranks."""
    if cfg.data.batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is the global batch and must divide evenly over {world_size} "
            f"processes; e.g. --data.batch_size {world_size * max(1, cfg.data.batch_size // world_size)}"
        )
    if cfg.data.source not in ("random", "shards"):
        raise ConfigError(
            f"the data-parallel dVAE trainer reads data.source=shards (or random), not {cfg.data.source!r}: "
            "pack the images as webdataset shards (img2dataset layout) and pass --data.shards"
        )


def _sum_hook(group, bucket):  # noqa: ANN001 - DDP inspects real annotations; postponed ones (strings) fail its check
    """All-reduce SUM (DDP's default averages): the loss is already divided by the replica count."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DistributedDVAETrainer(DVAETrainer):
    """``DVAETrainer`` over ``WORLD_SIZE`` data-parallel replicas under torchrun."""

    def __init__(self, cfg: DVAERunConfig) -> None:
        super().__init__(cfg)
        self.device = init_distributed("auto")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        validate_dvae_parallel(cfg, self.world)
        self.replicas = self.world  # the loss is divided by M; the hook sums [P D.3]
        self.process_group = dist.group.WORLD
        self.generators["gumbel"] = torch.Generator(device=self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def build(self) -> DistributedDVAETrainer:
        super().build()  # same seed on every rank: identical initial weights
        self.ddp = DistributedDataParallel(self.model, broadcast_buffers=False)
        self.ddp.register_comm_hook(dist.group.WORLD, _sum_hook)
        return self

    def build_data(self) -> None:
        data = self.cfg.data
        if data.source == "shards":
            # Each rank reads its own shards with the per-rank batch [P A.2: per-GPU batch 8, total 512].
            local = dataclasses.replace(data, batch_size=data.batch_size // self.world)
            self.loader = image_loader("dvae", self.cfg.model.image_size, local, self.rank, self.world)

    def _cursor_file(self) -> Path:
        return self.out_dir / f"data_rank{self.rank}of{self.world}.pt"

    def next_batch(self) -> torch.Tensor:
        data = self.cfg.data
        if data.source == "shards":
            images = self.loader.next_batch()["images"]  # (B/M, 3, H, W) uint8
            return images.to(self.device).float() / 255.0
        per = data.batch_size // self.world
        images = random_images(data.batch_size, self.cfg.model.image_size, data.seed, self.step_num)
        images = images[self.rank * per : (self.rank + 1) * per]  # this rank's slice of the global batch
        return images.to(self.device).float() / 255.0  # (B/M, 3, H, W) in [0, 1]

    def compute_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.step_num
        # Gumbel noise: a stream per (rank, step), so a resumed run draws exactly what the uninterrupted one did.
        self.generators["gumbel"].manual_seed(self.cfg.train.seed + 1 + 7919 * self.rank + 1_000_003 * s)
        loss, metrics = self.ddp(
            batch,
            temperature=self.schedules.temperature_at(s),
            kl_weight=self.schedules.kl_weight_at(s),
            generator=self.generators["gumbel"],
            objective=self.objective,
        )
        # Report global-batch means: average the detached metrics over the replicas.
        names = sorted(metrics)
        stacked = torch.stack([metrics[k].float().reshape(()) for k in names])
        dist.all_reduce(stacked)
        metrics = {k: v / self.world for k, v in zip(names, stacked)}
        metrics["temperature"] = torch.tensor(self.schedules.temperature_at(s))
        metrics["kl_weight"] = torch.tensor(self.schedules.kl_weight_at(s))
        return loss, metrics

    def data_state(self) -> dict[str, Any]:
        return {}  # each rank's shard cursor goes into its own file (see save)

    def load_data_state(self, state: dict[str, Any]) -> None:
        pass

    def save(self, path: str | Path | None = None) -> Path:
        state = self.state_dict()  # every rank builds it (cheap); rank 0 writes
        target = Path(path or self.out_dir / "checkpoint.pt")
        if self.cfg.data.source == "shards":  # per-rank cursors first, tagged with the step they belong to
            save_checkpoint(self._cursor_file(), {"step": self.step_num, "cursor": self.loader.state_dict()})
        dist.barrier()
        if self.is_main:
            save_checkpoint(target, state)
        dist.barrier()
        return target

    def load(self, path: str | Path | None = None) -> None:
        super().load(path)
        if self.cfg.data.source != "shards":
            return
        file = self._cursor_file()
        saved = load_checkpoint(file) if file.is_file() else None
        if saved is not None and int(saved["step"]) == self.step_num:
            self.loader.load_state_dict(saved["cursor"])
        elif self.is_main:
            print(f"[dalle_dist] no shard cursor for step {self.step_num} on {self.world} ranks: the data restarts at "
                  "epoch 0", flush=True)  # fmt: skip

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
