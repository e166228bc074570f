"""The two stages' trainers: what a batch is, how a loss is made, how the step size moves."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, DataConfig, DVAERunConfig, PriorRunConfig, from_dict
from ..data.folder import EpochSampler, read_folder
from ..data.pipeline import ShardLoader, image_loader, token_loader
from ..data.random_batches import random_images, random_tokens
from ..data.text import ByteTokenizer, pad_batch
from ..models.dvae import DiscreteVAE, DVAEObjective
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
        self.objective = DVAEObjective.from_optim(cfg.optim)  # fixed for the run: built once, not every step
        self.generators["gumbel"] = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 1)

    def build_model(self) -> nn.Module:
        return DiscreteVAE(self.cfg.model)

    def build_data(self) -> None:
        data = self.cfg.data
        if data.source == "tokens":
            raise ConfigError(
                "data.source=tokens holds dVAE codes for the prior; the dVAE trains on images: "
                "use --data.source shards --data.shards 'data/{000000..000009}.tar'"
            )
        if data.source == "folder":
            pairs = read_folder(data.path, self.cfg.model.image_size)
            self.images = pairs.images
            self.sampler = EpochSampler(len(self.images), data.batch_size, data.seed)
        elif data.source == "shards":
            # Listing 1 at the model's input side [P App. A.2]; one data-parallel rank until the engine passes its own.
            self.loader: ShardLoader = image_loader("dvae", self.cfg.model.image_size, data)

    def next_batch(self) -> torch.Tensor:
        data = self.cfg.data
        if data.source == "folder":
            images = self.images[self.sampler.next_indices()]
        elif data.source == "shards":
            images = self.loader.next_batch()["images"]  # (B, 3, H, W) uint8
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
            objective=self.objective,
        )
        metrics = dict(metrics)
        metrics["temperature"] = torch.tensor(self.schedules.temperature_at(s))
        metrics["kl_weight"] = torch.tensor(self.schedules.kl_weight_at(s))
        return loss, metrics

    def lr_at(self, step: int) -> float:
        return self.schedules.lr_at(step)

    def data_state(self) -> dict[str, Any]:
        return _data_state(self)

    def load_data_state(self, state: dict[str, Any]) -> None:
        _load_data_state(self, state)


def _data_state(trainer: Trainer) -> dict[str, Any]:
    """The data cursor that goes into checkpoints: the folder sampler's or the shard loader's."""
    source = trainer.cfg.data.source
    if source == "folder":
        return trainer.sampler.state_dict()
    if source in ("shards", "tokens"):
        return trainer.loader.state_dict()
    return {}


def _load_data_state(trainer: Trainer, state: dict[str, Any]) -> None:
    source = trainer.cfg.data.source
    if source == "folder":
        trainer.sampler.load_state_dict(state)
    elif source in ("shards", "tokens"):
        trainer.loader.load_state_dict(state)


def build_tokenizer(data: DataConfig, text_vocab: int, training: bool = True) -> Any:
    """The caption tokenizer: the BPE JSON at ``data.tokenizer`` (dropout while training [P §2.2]) or bytes."""
    if data.tokenizer:
        from ..data.tokenizer import load_tokenizer  # imported lazily: HF tokenizers only when used

        tokenizer = load_tokenizer(data.tokenizer, data.bpe_dropout)
        if training and hasattr(tokenizer, "train_mode"):
            tokenizer.train_mode(True)
    else:
        tokenizer = ByteTokenizer()
    if tokenizer.vocab_size > text_vocab:
        raise ValueError(
            f"model.text_vocab={text_vocab} < the tokenizer's {tokenizer.vocab_size} ids: "
            f"set --model.text_vocab {tokenizer.vocab_size}"
        )
    return tokenizer


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
        self.schedule = PlateauHalvingLR.from_config(cfg.optim)

    def build_model(self) -> nn.Module:
        return DallePrior(self.cfg.model)

    def build_data(self) -> None:
        data, m = self.cfg.data, self.cfg.model
        if data.source == "shards":
            raise ConfigError(
                "the prior reads dVAE tokens, not images: run dalle-dist pretokenize --shards SHARDS --dvae "
                "runs/dvae/checkpoint.pt --out DIR, then train with --data.source tokens --data.shards DIR"
            )
        if data.source == "tokens":
            self._check_token_grid()
            tokenizer = build_tokenizer(data, m.text_vocab)
            self.loader = token_loader(data, tokenizer, m.caption_len, m.grid, m.image_vocab, m.text_pad_id)
            return
        if data.source != "folder":
            return
        dvae = load_dvae(data.dvae_checkpoint, self.device)
        if dvae.cfg.grid != m.grid or dvae.cfg.vocab_size != m.image_vocab:
            raise ValueError(
                f"dVAE makes a {dvae.cfg.grid}×{dvae.cfg.grid} grid of {dvae.cfg.vocab_size} codes but the prior "
                f"expects {m.grid}×{m.grid} of {m.image_vocab}: set --model.grid {dvae.cfg.grid} "
                f"--model.image_vocab {dvae.cfg.vocab_size}"
            )
        # Tokenized once here, so no BPE dropout: it would freeze one random segmentation per caption.
        tokenizer = build_tokenizer(data, m.text_vocab, training=False)
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
        elif data.source == "tokens":
            batch = self.loader.next_batch()
            text, image = batch["text"], batch["image"]  # (B, caption_len), (B, grid²)
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
        return _data_state(self)

    def load_data_state(self, state: dict[str, Any]) -> None:
        _load_data_state(self, state)

    def _check_token_grid(self) -> None:
        """Fail at build time, with the fix, when the token shards were made by a dVAE of another grid."""
        from ..data.pipeline import CODES_EXTENSION, load_codes
        from ..data.shards import expand_shards, read_shard

        m = self.cfg.model
        for raw in read_shard(expand_shards(self.cfg.data.shards)[0], Counter()):
            if raw.get(CODES_EXTENSION) is None:
                raise ValueError(
                    f"{raw.get('__url__')!r} holds no .codes.npy members: data.source=tokens needs the output of "
                    "dalle-dist pretokenize, not image shards"
                )
            grid = int(load_codes(raw[CODES_EXTENSION]).shape[0])
            if grid != m.grid:
                raise ValueError(
                    f"token shards hold {grid}×{grid} code grids but the prior expects {m.grid}×{m.grid}: "
                    f"set --model.grid {grid}"
                )
            return


TRAINERS: dict[str, type[Trainer]] = {"dvae": DVAETrainer, "prior": PriorTrainer}
