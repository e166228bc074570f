"""Tests run from the repository root so that `configs/...` paths resolve as they do for users."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
