"""The two stages' trainers: what a batch is, how a loss is made, how the step size moves."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import DVAERunConfig, PriorRunConfig, from_dict
from ..data.folder import EpochSampler, read_folder
from ..data.random_batches import random_images, random_tokens
from ..data.text import ByteTokenizer, pad_batch
from ..models.dvae import DiscreteVAE
from ..models.prior import DallePrior
from .checkpoint import load_checkpoint
from .schedules import DVAESchedules, PlateauHalvingLR
from .trainer import Trainer


class DVAETrainer(Trainer):
    """Stage 1: Gumbel-softmax relaxation with β, τ and lr on cosine schedules [P §2.1, A.2]."""

    stage = "dvae"
    cfg: DVAERunConfig

    def __init__(self, cfg: DVAERunConfig) -> None:
        super().__init__(cfg)
        self.schedules = DVAESchedules.from_config(cfg.optim)
        self.generators["gumbel"] = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 1)

    def build_model(self) -> nn.Module:
        return DiscreteVAE(self.cfg.model)

    def build_data(self) -> None:
        data = self.cfg.data
        if data.source == "folder":
            pairs = read_folder(data.path, self.cfg.model.image_size)
            self.images = pairs.images
            self.sampler = EpochSampler(len(self.images), data.batch_size, data.seed)

    def next_batch(self) -> torch.Tensor:
        data = self.cfg.data
        if data.source == "folder":
            images = self.images[self.sampler.next_indices()]
        else:
            images = random_images(data.batch_size, self.cfg.model.image_size, data.seed, self.step_num)
        return images.to(self.device).float() / 255.0  # (B, 3, H, W) in [0, 1]

    def compute_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.step_num
        loss, metrics = self.model(
            batch,
            temperature=self.schedules.temperature_at(s),
            kl_weight=self.schedules.kl_weight_at(s),
            generator=self.generators["gumbel"],
        )
        metrics = dict(metrics)
        metrics["temperature"] = torch.tensor(self.schedules.temperature_at(s))
        metrics["kl_weight"] = torch.tensor(self.schedules.kl_weight_at(s))
        return loss, metrics

    def lr_at(self, step: int) -> float:
        return self.schedules.lr_at(step)

    def data_state(self) -> dict[str, Any]:
        return self.sampler.state_dict() if self.cfg.data.source == "folder" else {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        if self.cfg.data.source == "folder":
            self.sampler.load_state_dict(state)


def load_dvae(path: str, device: torch.device | str = "cpu", use_ema: bool = True) -> DiscreteVAE:
    """A trained dVAE from a DVAETrainer checkpoint, EMA weights by default [P A.2]."""
    state = load_checkpoint(path)
    if state.get("stage") != "dvae":
        raise ValueError(f"{path!r} is a {state.get('stage')!r} checkpoint; a dVAE checkpoint is needed")
    cfg = from_dict("dvae", state["config"])
    model = DiscreteVAE(cfg.model)
    model.load_state_dict(state["model"])
    if use_ema:
        weights = model.state_dict()
        for k, v in state["ema"]["shadow"].items():
            weights[k].copy_(v)
    return model.to(device).eval()


class PriorTrainer(Trainer):
    """Stage 2: next-token prediction over caption + image tokens, loss text×1/8 + image×7/8 [P §2.2]."""

    stage = "prior"
    cfg: PriorRunConfig

    def __init__(self, cfg: PriorRunConfig) -> None:
        super().__init__(cfg)
        o = cfg.optim
        self.schedule = PlateauHalvingLR(
            o.lr, o.warmup_steps, o.max_halvings, o.plateau_patience, o.plateau_smoothing, o.plateau_min_delta
        )

    def build_model(self) -> nn.Module:
        return DallePrior(self.cfg.model)

    def build_data(self) -> None:
        data, m = self.cfg.data, self.cfg.model
        if data.source != "folder":
            return
        dvae = load_dvae(data.dvae_checkpoint, self.device)
        if dvae.cfg.grid != m.grid or dvae.cfg.vocab_size != m.image_vocab:
            raise ValueError(
                f"dVAE makes a {dvae.cfg.grid}×{dvae.cfg.grid} grid of {dvae.cfg.vocab_size} codes but the prior "
                f"expects {m.grid}×{m.grid} of {m.image_vocab}: set --model.grid {dvae.cfg.grid} "
                f"--model.image_vocab {dvae.cfg.vocab_size}"
            )
        tokenizer = ByteTokenizer()
        if tokenizer.vocab_size > m.text_vocab:
            raise ValueError(f"model.text_vocab={m.text_vocab} < the byte tokenizer's {tokenizer.vocab_size}")
        pairs = read_folder(data.path, dvae.cfg.image_size)
        codes = []
        with torch.no_grad():
            for chunk in pairs.images.split(64):
                codes.append(dvae.encode_codes(chunk.to(self.device).float() / 255.0).flatten(1).cpu())
        self.image_tokens = torch.cat(codes)  # (N, grid²)
        self.text_tokens = pad_batch([tokenizer.encode(c, m.caption_len) for c in pairs.captions], m.caption_len)
        self.sampler = EpochSampler(len(self.image_tokens), data.batch_size, data.seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        data, m = self.cfg.data, self.cfg.model
        if data.source == "folder":
            idx = self.sampler.next_indices()
            text, image = self.text_tokens[idx], self.image_tokens[idx]
        else:
            text, image = random_tokens(
                data.batch_size, m.caption_len, m.text_vocab, m.image_len, m.image_vocab, data.seed, self.step_num
            )
        return text.to(self.device), image.to(self.device)

    def compute_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        text, image = batch
        return self.model.loss(text, image)

    def lr_at(self, step: int) -> float:
        return self.schedule.lr_at(step)

    def after_step(self, metrics: dict[str, float]) -> None:
        if self.schedule.observe(self.step_num, metrics["loss"]):
            metrics["lr_halved"] = float(self.schedule.halvings)

    def extra_state(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])

    def data_state(self) -> dict[str, Any]:
        return self.sampler.state_dict() if self.cfg.data.source == "folder" else {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        if self.cfg.data.source == "folder":
            self.sampler.load_state_dict(state)


TRAINERS: dict[str, type[Trainer]] = {"dvae": DVAETrainer, "prior": PriorTrainer}
