"""``dalle-dist``: the command-line entry point.

Examples::

    dalle-dist train-dvae --config configs/dvae/tiny.yaml --train.steps 200
    dalle-dist train-prior --config configs/prior/tiny.yaml --optim.lr 3e-4 --train.out_dir runs/prior
    dalle-dist plan --prior 12B --dvae openai --json
    dalle-dist config --stage prior --config configs/prior/tiny.yaml --model.flavor small
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from .config import FLAVORS, ConfigError, build_config, parse_overrides, to_dict

OVERRIDES_HELP = (
    "Any config key can be set with a dotted override, e.g. --optim.lr 3e-4 --train.steps 500 "
    "--model.flavor small. Sections: model, optim, data, train. `dalle-dist config --stage STAGE` prints every "
    "key with its value; unknown keys are refused with the closest valid name."
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="YAML overlay (repeatable; later files win), e.g. configs/prior/tiny.yaml",
    )
    p.add_argument("--flavor", help="shorthand for --model.flavor")


def _resolve(stage: str, args: argparse.Namespace, extra: list[str]) -> Any:
    overrides = parse_overrides(extra)
    if args.flavor:
        overrides["model.flavor"] = args.flavor
    return build_config(stage, args.config, overrides)


def _cmd_train(stage: str, args: argparse.Namespace, extra: list[str]) -> int:
    cfg = _resolve(stage, args, extra)
    from .train.stages import TRAINERS  # heavy import only when training

    trainer = TRAINERS[stage](cfg)
    history = trainer.fit()
    last = history[-1] if history else {}
    print(
        json.dumps(
            {"stage": stage, "steps": trainer.step_num, "out_dir": str(trainer.out_dir), "last": last}, sort_keys=True
        )
    )
    return 0


def _cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"plan takes no overrides, got {extra}")
    if args.prior is None and args.dvae is None:
        raise ConfigError("plan needs --prior FLAVOR and/or --dvae FLAVOR")
    from .plan import format_plan, plan

    result = plan(prior=args.prior, dvae=args.dvae)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _cmd_config(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = _resolve(args.stage, args, extra)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"export takes no overrides, got {extra}")
    from .train.export import export

    out = export(args.out, args.prior, args.dvae, args.tokenizer, use_ema=not args.no_ema)
    print(json.dumps({"export": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle-dist",
        description="Train DALL-E-style models: a discrete VAE (stage 1) and a sparse-transformer prior (stage 2).",
        epilog=OVERRIDES_HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for stage, what in (("dvae", "the discrete VAE (stage 1)"), ("prior", "the transformer prior (stage 2)")):
        p = sub.add_parser(
            f"train-{stage}",
            help=f"train {what} in one process",
            description=f"Train {what} in one process. Writes checkpoint.pt, metrics.jsonl and config.json "
            f"to --train.out_dir and resumes from there when a checkpoint exists. Flavors: "
            f"{', '.join(FLAVORS[stage])}.",
            epilog=OVERRIDES_HELP,
        )
        _add_config_args(p)
        p.set_defaults(run=lambda a, e, s=stage: _cmd_train(s, a, e))

    p = sub.add_parser(
        "plan",
        help="count parameters and weight bytes of a flavor (meta device, no memory)",
        description="Build the models on the meta device and print parameter counts and weight sizes.",
    )
    p.add_argument("--prior", choices=list(FLAVORS["prior"]), help="prior flavor, e.g. 12B")
    p.add_argument("--dvae", choices=list(FLAVORS["dvae"]), help="dVAE flavor, e.g. openai")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_cmd_plan)

    p = sub.add_parser(
        "config",
        help="print a resolved config as YAML",
        description="Resolve defaults, flavor, YAML overlays and overrides; print the result as YAML.",
        epilog=OVERRIDES_HELP,
    )
    p.add_argument("--stage", choices=["dvae", "prior"], required=True)
    _add_config_args(p)
    p.set_defaults(run=_cmd_config)

    p = sub.add_parser(
        "export",
        help="write one safetensors file + config (+ tokenizer) for generation",
        description="Export trained weights (EMA by default) into DIR/model.safetensors and DIR/config.json. The prior "
        "checkpoint may be a single-process checkpoint.pt, a distributed step directory, or a run directory (its "
        "latest checkpoint). Loading an export never unpickles anything.",
    )
    p.add_argument("--prior", required=True, help="prior checkpoint: checkpoint.pt, checkpoints/step_N, or run dir")
    p.add_argument("--dvae", help="dVAE checkpoint.pt (from train-dvae), bundled for decoding images")
    p.add_argument("--tokenizer", help="BPE tokenizer JSON to copy alongside")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.set_defaults(run=_cmd_export)

    from .data.commands import register as register_data_commands

    register_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return args.run(args, extra)
    except ConfigError as err:
        print(f"dalle-dist: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
