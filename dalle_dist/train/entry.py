"""One way into training for every launcher: ``dalle-dist train-*``, ``torchrun launch/run.py``, ``python -m``.

``check_config`` runs every check that needs no process group (before one starts); ``run_training`` builds the
stage's trainer for the processes it finds (``WORLD_SIZE`` from torchrun, else one process), trains to
``train.steps`` (resuming from ``train.out_dir``) and closes the process group.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import DVAERunConfig, PriorRunConfig


def world_size() -> int:
    """Processes in this job: torchrun's ``WORLD_SIZE``, or 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_config(stage: str, cfg: DVAERunConfig | PriorRunConfig, world: int | None = None) -> None:
    """Raise ``ConfigError`` (with the fix in the message) for a config this many processes cannot run."""
    from .stages import TRAINERS

    TRAINERS[stage].check_config(cfg, world_size() if world is None else world)


def run_training(stage: str, cfg: DVAERunConfig | PriorRunConfig) -> tuple[Any, list[dict[str, float]]]:
    """Check, build, train, close; returns (the trainer, its per-step metrics)."""
    from .stages import TRAINERS

    check_config(stage, cfg)
    trainer = TRAINERS[stage](cfg)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    return trainer, history
