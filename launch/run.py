"""torchrun entry point: one process per GPU (or per CPU slot), all stages of the prior on one mesh.

    torchrun --nnodes 1 --nproc-per-node 4 launch/run.py --config configs/prior/tiny.yaml \\
        --parallel.topology pp=2,shard=2 --train.steps 20 --train.out_dir runs/pp2_shard2

    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:29500 launch/run.py ...

Every option of ``dalle-dist train-prior`` works here as ``--section.key value``; ``parallel.topology`` must
multiply out to N·G. The config is validated before the process group starts. Rank 0 writes metrics.jsonl;
an exception on any rank is recorded per rank by torchelastic (``@record``).

This file is a shim over :func:`dalle_dist.launch.main` for checkouts and the SLURM scripts; with the package
installed, ``torchrun ... -m dalle_dist.launch ...`` is the same program.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dalle_dist.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="launch/run.py"))
