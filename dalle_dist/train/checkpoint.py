"""Single-process checkpoints: one file, written atomically, loaded without unpickling code.

The distributed engine replaces the model/optimizer part with ``torch.distributed.checkpoint``; the rest of
the state (step, schedules, EMA, data cursor, RNG) keeps this shape.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..files import load_checkpoint, save_checkpoint

__all__ = ["load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG a run draws from: torch CPU (and CUDA), Python's, and the trainer's own generators."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
