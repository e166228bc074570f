"""Learning-rate, KL-weight and temperature schedules [P A.2, B.2].

Closed-form schedules are pure functions of the step; the prior's plateau rule is a small stateful object
with ``state_dict()`` so a resumed run halves at the same step the uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``steps``; held at ``end`` afterwards.

    The paper anneals τ, β and the dVAE step size with cosine schedules; a linear τ schedule
    "typically led to divergence" [P A.2].
    """
    if steps <= 0:
        return end
    frac = min(max(step, 0), steps) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class DVAESchedules:
    """β: 0 → kl_weight over kl_warmup; τ: temp_start → temp_final; lr: lr → lr_final [P A.2]."""

    lr: float
    lr_final: float
    lr_steps: int
    kl_weight: float
    kl_warmup_steps: int
    temp_start: float
    temp_final: float
    temp_steps: int

    @classmethod
    def from_config(cls, optim: Any) -> DVAESchedules:
        s = optim.schedule_scale
        return cls(
            lr=optim.lr,
            lr_final=optim.lr_final,
            lr_steps=max(1, round(optim.lr_steps * s)),
            kl_weight=optim.kl_weight,
            kl_warmup_steps=max(1, round(optim.kl_warmup_steps * s)),
            temp_start=optim.temp_start,
            temp_final=optim.temp_final,
            temp_steps=max(1, round(optim.temp_steps * s)),
        )

    def lr_at(self, step: int) -> float:
        return cosine(step, self.lr, self.lr_final, self.lr_steps)

    def kl_weight_at(self, step: int) -> float:
        return cosine(step, 0.0, self.kl_weight, self.kl_warmup_steps)

    def temperature_at(self, step: int) -> float:
        return cosine(step, self.temp_start, self.temp_final, self.temp_steps)


class PlateauHalvingLR:
    """Linear warmup to ``lr``, then halve whenever the smoothed training loss plateaus [P B.2].

    The paper halved by hand "whenever the training loss appears to plateau", five times in 430k updates.
    Here a plateau is ``patience`` steps with no new best smoothed loss (relative ``min_delta``).

    With ``decay_steps > 0`` the LR also follows a half-cosine from ``lr`` at the end of warmup to ``lr_final`` at
    ``decay_steps`` (not the paper's: for runs that end long before any plateau, like the demo's); halvings
    multiply it.
    """

    def __init__(
        self,
        lr: float,
        warmup_steps: int,
        max_halvings: int = 5,
        patience: int = 2000,
        smoothing: float = 0.99,
        min_delta: float = 1e-3,
        decay_steps: int = 0,
        lr_final: float = 0.0,
    ) -> None:
        if decay_steps and decay_steps <= warmup_steps:
            raise ValueError(f"decay_steps={decay_steps} must exceed warmup_steps={warmup_steps}")
        self.base_lr = lr
        self.decay_steps = decay_steps
        self.lr_final = lr_final
        self.warmup_steps = warmup_steps
        self.max_halvings = max_halvings
        self.patience = patience
        self.smoothing = smoothing
        self.min_delta = min_delta
        self.halvings = 0
        self.smoothed: float | None = None
        self.best = math.inf
        self.since_best = 0

    def lr_at(self, step: int) -> float:
        """LR for the update numbered ``step`` (0-based): warmup reaches ``lr`` at ``warmup_steps``."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        lr = self.base_lr
        if self.decay_steps > 0:
            lr = cosine(step - self.warmup_steps, self.base_lr, self.lr_final, self.decay_steps - self.warmup_steps)
        return lr * warm * 0.5**self.halvings

    @classmethod
    def from_config(cls, optim: Any) -> PlateauHalvingLR:
        """From a :class:`dalle_dist.config.PriorOptimConfig`."""
        return cls(
            optim.lr, optim.warmup_steps, optim.max_halvings, optim.plateau_patience, optim.plateau_smoothing,
            optim.plateau_min_delta, optim.lr_steps, optim.lr_final,
        )  # fmt: skip

    def observe(self, step: int, loss: float) -> bool:
        """Feed the step's training loss; returns True when this observation halved the LR."""
        if not math.isfinite(loss):
            return False
        self.smoothed = loss if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        if step < self.warmup_steps:
            return False
        if self.smoothed < self.best * (1 - self.min_delta):
            self.best = self.smoothed
            self.since_best = 0
            return False
        self.since_best += 1
        if self.since_best >= self.patience and self.halvings < self.max_halvings:
            self.halvings += 1
            self.since_best = 0
            self.best = self.smoothed
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "halvings": self.halvings,
            "smoothed": self.smoothed,
            "best": self.best,
            "since_best": self.since_best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.halvings = int(state["halvings"])
        self.smoothed = None if state["smoothed"] is None else float(state["smoothed"])
        self.best = float(state["best"])
        self.since_best = int(state["since_best"])
