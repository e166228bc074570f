"""Trained models from trainer checkpoints, for the tools downstream of training (pretokenize, reports)."""

from __future__ import annotations

import torch

from ..config import from_dict
from ..files import load_checkpoint
from .dvae import DiscreteVAE


def load_dvae(path: str, device: torch.device | str = "cpu", use_ema: bool = True) -> DiscreteVAE:
    """A trained dVAE from a ``train-dvae`` checkpoint, EMA weights by default [P A.2]."""
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
