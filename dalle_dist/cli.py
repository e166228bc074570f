"""``dalle-dist``: the command-line entry point.

Examples::

    dalle-dist train-dvae --config configs/dvae/tiny.yaml --train.steps 200
    dalle-dist train-prior --config configs/prior/tiny.yaml --optim.lr 3e-4 --train.out_dir runs/prior
    dalle-dist plan --prior 12B --dvae openai --json
    dalle-dist config --stage prior --config configs/prior/tiny.yaml --model.flavor small

``train-*`` run one process; the same trainers run under torchrun through :mod:`dalle_dist.launch`::

    torchrun --nproc-per-node 2 -m dalle_dist.launch --stage prior --config configs/prior/tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from .config import FLAVORS, ConfigError, add_config_arguments, config_from_args, to_dict

OVERRIDES_HELP = (
    "Any config key can be set with a dotted override, e.g. --optim.lr 3e-4 --train.steps 500 "
    "--model.flavor small. Sections: model, optim, data, train. `dalle-dist config --stage STAGE` prints every "
    "key with its value; unknown keys are refused with the closest valid name."
)


def _cmd_train(stage: str, args: argparse.Namespace, extra: list[str]) -> int:
    cfg = config_from_args(stage, args, extra)
    from .train.entry import run_training  # heavy import only when training

    trainer, history = run_training(stage, cfg)
    last = history[-1] if history else {}
    print(
        json.dumps(
            {"stage": stage, "steps": trainer.step_num, "out_dir": str(trainer.out_dir), "last": last}, sort_keys=True
        )
    )
    return 0


def _cmd_config(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = config_from_args(args.stage, args, extra)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"export takes no overrides, got {extra}")
    from .train.export import export

    try:
        out = export(args.out, args.prior, args.dvae, args.tokenizer, use_ema=not args.no_ema, reranker=args.reranker)
    except FileNotFoundError as err:  # a path the user typed: name it without a traceback
        print(f"dalle-dist export: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"export": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


def _cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"generate takes no overrides, got {extra}")
    from .sample.cli import run

    return run(args)


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
            help=f"train {what} in one process (or under torchrun: -m dalle_dist.launch --stage {stage})",
            description=f"Train {what} in one process. The same trainer runs under torchrun, one process per "
            f"device: torchrun --nproc-per-node N -m dalle_dist.launch --stage {stage} [the same options]. Writes "
            f"checkpoint.pt, metrics.jsonl and config.json to --train.out_dir and resumes from there when a "
            f"checkpoint exists. Flavors: {', '.join(FLAVORS[stage])}.",
            epilog=OVERRIDES_HELP,
        )
        add_config_arguments(p)
        p.set_defaults(run=lambda a, e, s=stage: _cmd_train(s, a, e))

    from .plan_cli import register as register_plan_command

    register_plan_command(sub)

    p = sub.add_parser(
        "config",
        help="print a resolved config as YAML",
        description="Resolve defaults, flavor, YAML overlays and overrides; print the result as YAML.",
        epilog=OVERRIDES_HELP,
    )
    p.add_argument("--stage", choices=["dvae", "prior"], required=True)
    add_config_arguments(p)
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
    p.add_argument(
        "--reranker", help="reranker directory (dalle-dist train-reranker) copied to OUT/reranker for generate --rerank"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser(
        "generate",
        help="sample images for captions from an export (KV cache, temperature, top-k, priming)",
        description="Sample image tokens for each caption with the KV cache and decode them with the dVAE; writes one "
        "PNG per sample, grid.png (a row per caption) and index.json.",
    )
    from .sample.cli import add_arguments as add_generate_arguments

    add_generate_arguments(p)
    p.set_defaults(run=_cmd_generate)

    from .eval.cli import register as register_eval_command

    register_eval_command(sub)
    from .rerank.cli import register as register_rerank_command

    register_rerank_command(sub)
    from .demo.cli import register as register_demo_command

    register_demo_command(sub)
    from .data.commands import register as register_data_commands

    register_data_commands(sub)
    from .train.convert import register as register_convert_command

    register_convert_command(sub)
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
