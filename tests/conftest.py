"""Tests run from the repository root so that `configs/...` paths resolve as they do for users."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
# One intra-op thread per process: the suite runs many processes (torchrun ranks, loaders) on 2 cores, and
# oversubscribed OpenMP threads slow small models down by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    """A trainer built in this process starts the 1-rank process group of the engine and keeps it for its
    ``step()`` / ``fit()`` calls (``close()`` ends it). Tests that do not close their trainer leave it behind; end it
    after each test so the next one (e.g. the dry run's fake group) starts from a process without a group."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
