"""Run launch/run.py under the real torchrun (``python -m torch.distributed.run --standalone``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "configs/prior/tiny.yaml", "--parallel.n_microbatches", "2", "--train.progress", "false"]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "launch/run.py", *args]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_cmd(nproc, *args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout
    )


def losses_by_step(out_dir: Path) -> dict[int, float]:
    """Loss of each logged step; a resumed run re-logs steps after its checkpoint, the last entry wins."""
    out: dict[int, float] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[int(row["step"])] = float(row["loss"])
    return out
