"""torchrun entry point: one process per GPU (or per CPU slot), all stages of the prior on one mesh.

    torchrun --nnodes 1 --nproc-per-node 4 launch/run.py --config configs/prior/tiny.yaml \\
        --parallel.topology pp=2,shard=2 --train.steps 20 --train.out_dir runs/pp2_shard2

    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:29500 launch/run.py ...

Every option of ``dalle-dist train-prior`` works here as ``--section.key value``; ``parallel.topology`` must
multiply out to N·G. The config is validated before the process group starts. Rank 0 writes metrics.jsonl;
an exception on any rank is recorded per rank by torchelastic (``@record``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dalle_dist.config import ConfigError, build_config, parse_overrides  # noqa: E402


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="launch/run.py",
        description="Distributed training under torchrun: the prior on pipeline × shard × replicate, the dVAE "
        "data-parallel.",
        epilog="Overrides: --section.key value, e.g. --parallel.topology pp=2,shard=2 --train.steps 100.",
    )
    p.add_argument("--stage", choices=["prior", "dvae"], default="prior", help="which model to train (default prior)")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="YAML overlay (repeatable)")
    p.add_argument("--flavor", help="shorthand for --model.flavor")
    return p.parse_known_args(argv)


@record
def main(argv: list[str] | None = None) -> int:
    args, extra = parse(argv)
    try:
        overrides = parse_overrides(extra)
        if args.flavor:
            overrides["model.flavor"] = args.flavor
        cfg = build_config(args.stage, args.config, overrides)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.stage == "prior":
            from dalle_dist.train.distributed import DistributedPriorTrainer as TrainerClass
            from dalle_dist.train.distributed import validate_parallel

            validate_parallel(cfg, world)
        else:
            from dalle_dist.train.dvae_distributed import DistributedDVAETrainer as TrainerClass
            from dalle_dist.train.dvae_distributed import validate_dvae_parallel

            validate_dvae_parallel(cfg, world)
    except ConfigError as err:
        print(f"launch/run.py: config error: {err}", file=sys.stderr)
        return 2

    trainer = TrainerClass(cfg).build()
    try:
        trainer.fit()  # resumes from the latest complete checkpoint in train.out_dir
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
