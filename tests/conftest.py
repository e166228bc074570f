"""Tests run from the repository root so that `configs/...` paths resolve as they do for users."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
# One intra-op thread per process: the suite runs many processes (torchrun ranks, loaders) on 2 cores, and
# oversubscribed OpenMP threads slow small models down by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")
