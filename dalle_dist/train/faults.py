"""Test-only fault injection for the distributed engine, switched on by an environment variable.

``DALLE_DIST_FAULT_NONFINITE_GRAD="RANK:STEP:BLOCK"`` makes global rank RANK multiply the gradient reaching the
output of resblock BLOCK by +inf during update STEP (1-based), so that block's parameter gradients become
nonfinite on that one rank only. The engine must then skip the update on every rank and divide only that
resblock's scale [P D.1, E.2(10)]; ``tests/distributed/test_dist_precision.py`` checks it.

The hook is installed from outside the model by the engine's build (the models know nothing of it), and only
when the variable is set; it is a forward hook on the resblock, so it runs once per forward, outside autocast
and activation checkpointing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

ENV_NONFINITE_GRAD = "DALLE_DIST_FAULT_NONFINITE_GRAD"


def install_faults(blocks: Mapping[str, nn.Module], rank: int, current_step: Callable[[], int]) -> str | None:
    """Install the fault named by the environment on this rank's resblocks; returns a description or None.

    ``current_step()`` returns the 1-based number of the update in progress.
    """
    spec = os.environ.get(ENV_NONFINITE_GRAD, "").strip()
    if not spec:
        return None
    try:
        rank_s, step_s, key = spec.split(":")
        want_rank, want_step = int(rank_s), int(step_s)
    except ValueError:
        raise ValueError(f"{ENV_NONFINITE_GRAD}={spec!r}: expected RANK:STEP:BLOCK, e.g. 1:2:3") from None
    if rank != want_rank or key not in blocks:
        return None

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and current_step() == want_step:
            output.register_hook(lambda g: g * math.inf)  # (B, T, d): every branch gradient becomes ±inf or NaN

    blocks[key].register_forward_hook(hook)
    return f"rank {rank}: nonfinite gradient planted in resblock {key} at update {want_step}"
