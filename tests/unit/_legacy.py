"""A ``checkpoint.pt`` in the format of the one-process prior trainer of earlier versions (before one engine).

Made the way that trainer made it: a DallePrior, AdamW32 over ``decay_groups`` of the whole model, an EMA of the
module, a few real updates on random tokens, and its state dict layout (model, optimizer, ema, extra.schedule, data,
rng, precision).
"""

from pathlib import Path

import torch

from dalle_dist.config import PriorRunConfig, build_config, to_dict
from dalle_dist.data.random_batches import random_tokens
from dalle_dist.files import save_checkpoint
from dalle_dist.models.prior import DallePrior
from dalle_dist.precision import AdamW32, decay_groups
from dalle_dist.train.checkpoint import rng_state
from dalle_dist.train.ema import EMA
from dalle_dist.train.schedules import PlateauHalvingLR


def legacy_prior_checkpoint(path: Path, steps: int = 3, **over: str) -> tuple[Path, PriorRunConfig]:
    cfg = build_config("prior", ["configs/prior/tiny.yaml"], {"train.out_dir": str(path.parent), **over})
    torch.manual_seed(cfg.train.seed)
    model = DallePrior(cfg.model)
    o = cfg.optim
    opt = AdamW32(decay_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    ema = EMA(model, o.ema_decay, o.ema_every)
    schedule = PlateauHalvingLR.from_config(o)
    m, d = cfg.model, cfg.data
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = schedule.lr_at(step)
        text, image = random_tokens(d.batch_size, m.caption_len, m.text_vocab, m.image_len, m.image_vocab, d.seed, step)
        opt.zero_grad()
        model.loss(text, image)[0].backward()
        opt.step()
        ema.update(model)
    state = {
        "stage": "prior", "config": to_dict(cfg), "step": steps, "model": model.state_dict(),
        "optimizer": opt.state_dict(), "ema": ema.state_dict(), "extra": {"schedule": schedule.state_dict()},
        "data": {}, "rng": rng_state({}), "precision": {"grad_scaler": None, "loss_scaler": None},
    }  # fmt: skip
    return save_checkpoint(path, state), cfg
