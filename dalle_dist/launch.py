"""The torchrun entry point: one process per GPU (or per CPU slot); the prior on pipeline × shard × replicate, the
dVAE data-parallel. ``python -m dalle_dist.launch`` and ``launch/run.py`` (a shim for checkouts and the SLURM
scripts) are the same program::

    torchrun --nnodes 1 --nproc-per-node 4 -m dalle_dist.launch --config configs/prior/tiny.yaml \\
        --parallel.topology pp=2,shard=2 --train.steps 20 --train.out_dir runs/pp2_shard2

    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m dalle_dist.launch ...

Every option of ``dalle-dist train-prior`` works here as ``--section.key value``; ``parallel.topology`` must
multiply out to N·G. The config is checked before the process group starts (a config error exits 2); training
then goes through :func:`dalle_dist.train.entry.run_training`, as ``dalle-dist train-*`` does in one process.
Rank 0 writes metrics.jsonl; an exception on any rank is recorded per rank by torchelastic (``@record``).
"""

from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .config import ConfigError, add_config_arguments, config_from_args
from .train.entry import check_config, run_training

PROG = "python -m dalle_dist.launch"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Distributed training under torchrun: the prior on pipeline × shard × replicate, the dVAE "
        "data-parallel.",
        epilog="Overrides: --section.key value, e.g. --parallel.topology pp=2,shard=2 --train.steps 100.",
    )
    p.add_argument("--stage", choices=["prior", "dvae"], default="prior", help="which model to train (default prior)")
    add_config_arguments(p)
    return p


@record
def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Parse, check (exit 2 on a config error, before any process group), train; the process exit code."""
    args, extra = build_parser(prog).parse_known_args(argv)
    try:
        cfg = config_from_args(args.stage, args, extra)
        check_config(args.stage, cfg)
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2
    run_training(args.stage, cfg)  # resumes from the latest complete checkpoint in train.out_dir
    return 0


if __name__ == "__main__":
    sys.exit(main())
