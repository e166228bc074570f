"""``dalle-dist plan``: parameter counts (``plan.py``), or with ``--dry-run`` the simulation (``plan_dry_run.py``).

``plan --dry-run --config YAML`` plans the run config exactly as the trainer's launcher resolves it
(``build_config("prior", files, overrides)``); the flags that name run-config keys (``--topology``,
``--precision``, ``--global-batch``, ...) and dotted overrides (``--section.key VALUE``) go on top of the YAML.
Without ``--config``, ``--prior FLAVOR`` and the flags describe the run, with the paper's defaults.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .config import FLAVORS, ConfigError, build_config, parse_overrides

# ``plan --dry-run`` options, named as the fields of ``plan_build.DryRunOptions``; None means its default.
DRY_RUN_OPTIONS = (
    "topology",
    "gpu",
    "precision",
    "powersgd_rank",
    "global_batch",
    "microbatches",
    "micro_batch",
    "virtual_stages",
    "master_weights",
    "moments",
    "attention",
    "ema_on_device",
    "pp_reshard_per_microbatch",
    "activation_checkpointing",
    "storage",
    "fc2_shard_dim",
    "nodes",
    "gpus_per_node",
)
CONFIG_HELP = (
    "--dry-run of a prior run config (repeatable; later files win), resolved as the trainer's launcher does; the "
    "flags below that name config keys and --section.key overrides go on top"
)


def _dry_run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.dvae is not None or (args.prior is None and not args.config):
        raise ConfigError(
            "plan --dry-run simulates training the prior: pass --prior FLAVOR or --config YAML (and no --dvae)"
        )
    from .plan_build import config_overrides
    from .plan_dry_run import DryRunOptions, dry_run, format_dry_run, prior_run_config

    given: dict[str, Any] = {k: getattr(args, k) for k in DRY_RUN_OPTIONS if getattr(args, k) is not None}
    if args.prior is not None:
        given["flavor"] = args.prior
    overrides = parse_overrides(extra)
    opts = DryRunOptions(**given)
    if args.config:
        if "micro_batch" in given:
            raise ConfigError("--micro-batch with --config: set the microbatches, --parallel.n_microbatches N")
        run_cfg = build_config("prior", args.config, {**config_overrides(given), **overrides})
    else:
        run_cfg = prior_run_config(opts, overrides=overrides)
    result = dry_run(opts, run_cfg)
    print(json.dumps(result, indent=2) if args.json else format_dry_run(result))
    return 0


def _plan(args: argparse.Namespace, extra: list[str]) -> int:
    if args.dry_run:
        return _dry_run(args, extra)
    if extra:
        raise ConfigError(f"plan takes no overrides, got {extra}; --section.key overrides go with --dry-run")
    unused = [k for k in DRY_RUN_OPTIONS if getattr(args, k) is not None] + (["config"] if args.config else [])
    if unused:
        raise ConfigError(f"--{unused[0].replace('_', '-')} is an option of the simulation: add --dry-run")
    if args.prior is None and args.dvae is None:
        raise ConfigError("plan needs --prior FLAVOR and/or --dvae FLAVOR")
    from .plan import format_plan, plan

    result = plan(prior=args.prior, dvae=args.dvae)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def register(sub: Any) -> None:  # argparse's _SubParsersAction
    """Add the ``plan`` subcommand to ``dalle-dist``'s subparsers."""
    p = sub.add_parser(
        "plan",
        help="count parameters and weight bytes of a flavor; --dry-run: per-rank memory of a training run",
        description="Build the models on the meta device and print parameter counts and weight sizes. With "
        "--dry-run, simulate one training step of the prior (docs/scaling.md): the trainer's own model building "
        "and FSDP2 on the meta device under a fake process group. Dotted overrides (--section.key VALUE) change "
        "the simulated run config.",
    )
    p.add_argument("--prior", choices=list(FLAVORS["prior"]), help="prior flavor, e.g. 12B")
    p.add_argument("--dvae", choices=list(FLAVORS["dvae"]), help="dVAE flavor, e.g. openai")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="simulate one training step of the prior on --topology: per-rank memory, pipeline bubble, replica "
        "traffic (meta device, fake process group; docs/scaling.md)",
    )
    p.add_argument("--config", action="append", default=[], metavar="YAML", help=CONFIG_HELP)
    p.add_argument("--topology", help="pp=P,replicate=R,shard=S (default pp=1,replicate=128,shard=8 [P B.2])")
    p.add_argument(
        "--gpu",
        help="v100-16gb (default), v100-32gb, a100-40gb, a100-80gb, h100-80gb, h200-141gb; usable = nominal "
        "− 1 GiB − 5%%",
    )
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], help="weight-matrix storage (default fp16)")
    p.add_argument("--powersgd-rank", type=int, help="total PowerSGD rank per matrix (12B: 896); 0 (default): none")
    p.add_argument("--global-batch", type=int, help="samples per step over all replicas (default 1024 [P B.2])")
    p.add_argument("--microbatches", type=int, help="pipeline microbatches (default: per-rank batch when pp > 1)")
    p.add_argument("--micro-batch", type=int, help="samples per microbatch (default 1 when pp > 1)")
    p.add_argument("--virtual-stages", type=int, help="stages per pp rank, interleaved 1F1B (default 1)")
    p.add_argument("--master-weights", action="store_const", const=True, help="precision.master_weights")
    p.add_argument("--moments", choices=["fp32", "bf16"], help="Adam moments of the 16-bit weights (default bf16)")
    p.add_argument("--attention", choices=["efficient", "math"], help="SDPA kernel (math materialises B·h·T²)")
    p.add_argument(
        "--ema-on-cpu",
        dest="ema_on_device",
        action="store_const",
        const=False,
        help="modelled: EMA off the GPU, as the paper [P B.2]",
    )
    p.add_argument(
        "--pp-reshard-per-microbatch",
        action="store_const",
        const=True,
        help="parallel.pp_reshard microbatch: reshard and reduce-scatter after every microbatch (default: step, "
        "torch's pipelining keeps each stage gathered until the last microbatch)",
    )
    p.add_argument(
        "--storage",
        choices=["engine", "policy"],
        help="engine (default): fp32 shards gathered in 16 bits, as the trainer builds; policy (modelled): 16-bit "
        "shards",
    )
    p.add_argument(
        "--no-activation-checkpointing",
        dest="activation_checkpointing",
        action="store_const",
        const=False,
        help="keep every resblock's activations (default: recompute them [P §2.4])",
    )
    p.add_argument(
        "--fc2-shard-dim",
        type=int,
        choices=[0, 1],
        help="parallel.fc2_shard_dim: FSDP2 shard dim of fc2 (1, default: along 4d, the paper's; 0: along d)",
    )
    p.add_argument("--nodes", type=int, help="machines; the topology must multiply out to nodes × gpus-per-node")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per machine (default 8 [P E.2])")
    p.set_defaults(run=_plan)
