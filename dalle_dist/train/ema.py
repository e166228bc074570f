"""Iterate averaging: an exponential moving average of the weights [P A.2 (dVAE), B.2 (prior)]."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EMA:
    """EMA of a module's floating-point parameters and buffers, kept in fp32 (on ``device``, or where they live).

    The prior copies its parameters "every 25 updates" with decay 0.99 [P B.2]; the dVAE uses decay 0.999
    [P A.2]. The trainers call ``update`` after every *applied* update (a skipped one changes nothing, the average
    included); only every ``every``-th call touches the average. Sharded parameters (DTensors) are averaged shard
    by shard, so the shadow is keyed by the one-process names and DCP reshards it like the weights.
    """

    def __init__(
        self, model: nn.Module, decay: float, every: int = 1, device: str | torch.device | None = None
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.every = max(1, every)
        self.device = torch.device(device) if device is not None else None
        self.calls = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().to(self.device or v.device, torch.float32, copy=True)
            for k, v in model.state_dict().items()
            if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.calls += 1
        if self.calls % self.every:
            return
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().to(self.shadow[k].device, torch.float32), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (for evaluation or export)."""
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "every": self.every, "calls": self.calls, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.every = int(state["every"])
        self.calls = int(state["calls"])
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: differing keys {sorted(missing)[:5]}")
        self.shadow = {k: v.to(self.shadow[k].device, torch.float32) for k, v in state["shadow"].items()}
