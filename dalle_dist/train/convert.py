"""``dalle-dist convert-checkpoint``: an old one-process prior ``checkpoint.pt`` → the engine's step directory.

Before one engine served every topology, ``dalle-dist train-prior`` wrote one ``checkpoint.pt`` (AdamW32 over the
whole model, 16-bit weights stored in 16 bits). The engine resumes from ``checkpoints/step_N`` directories, so this
builds the 1-rank engine from the checkpoint's own config, puts the weights, Adam moments, EMA, LR schedule, grad
scales and data cursor into it by parameter name, and saves step N next to the old file. The run then resumes
from there, on one process or any topology (DCP reshards).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..config import from_dict
from ..files import load_checkpoint
from ..models.prior import DallePrior
from ..precision import decay_groups


def _old_param_names(cfg: Any, weight_decay: float) -> list[str]:
    """The parameter names in the order the old trainer's optimizer indexed them (its ``decay_groups``)."""
    with torch.device("meta"):
        model = DallePrior(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in decay_groups(model, weight_decay) for p in group["params"]]


@torch.no_grad()
def _load_optimizer(trainer: Any, saved: dict[str, Any], names: list[str]) -> None:
    """Adam moments (and step counts) by name; the engine's fp32 storage is the master copy, so ``master`` is
    dropped (with master weights the old fp32 copy becomes the weight)."""
    order = [i for group in saved["param_groups"] for i in group["params"]]
    for index, name in zip(order, names):
        old = saved["state"].get(index)
        if not old:
            continue
        p = trainer.named[name]
        moments = trainer.optimizer._moment_dtype(p) if hasattr(trainer.optimizer, "_moment_dtype") else p.dtype
        trainer.optimizer.state[p] = {
            "step": torch.as_tensor(old["step"], dtype=torch.float32).clone(),
            "exp_avg": old["exp_avg"].to(p.device, moments).clone(),
            "exp_avg_sq": old["exp_avg_sq"].to(p.device, moments).clone(),
        }
        if "master" in old:
            p.copy_(old["master"])


def convert_checkpoint(old: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``OUT/checkpoints/step_N`` from an old prior ``checkpoint.pt`` (OUT: the file's directory)."""
    from .prior import PriorTrainer  # the engine: imported when converting only

    old = Path(old)
    state = load_checkpoint(old)
    if state.get("stage") != "prior":
        raise ValueError(f"{old} is a {state.get('stage')!r} checkpoint; convert-checkpoint converts prior ones")
    cfg = from_dict("prior", state["config"])
    cfg.train.out_dir = str(out_dir or old.parent)
    cfg.parallel.topology = "pp=1,replicate=1,shard=1"
    trainer = PriorTrainer(cfg).build()
    try:
        with torch.no_grad():
            for name, p in trainer.named.items():
                p.copy_(state["model"][name])  # 16-bit values into the fp32 storage, exactly
        _load_optimizer(trainer, state["optimizer"], _old_param_names(cfg, cfg.optim.weight_decay))
        trainer.ema.load_state_dict(state["ema"])
        trainer.schedule.load_state_dict(state["extra"]["schedule"])
        scaler = (state.get("precision") or {}).get("grad_scaler")
        if trainer.grad_scaler is not None and scaler is not None:
            trainer.grad_scaler.load_state_dict(scaler)
        data = state.get("data") or {}
        if trainer.data.sampler is not None and data:
            trainer.data.sampler.load_state_dict(data)
        elif trainer.data.loader is not None and data:
            trainer.data.loader.load_state_dict(data)
        trainer.step_num = int(state["step"])
        return trainer.save()
    finally:
        trainer.close()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-checkpoint",
        help="turn an old one-process prior checkpoint.pt into a step directory the engine resumes from",
        description="Read a prior checkpoint.pt written by earlier versions' one-process trainer and write "
        "OUT/checkpoints/step_N (weights, Adam moments, EMA, LR schedule, grad scales, data cursor), so "
        "dalle-dist train-prior or torchrun launch/run.py --train.out_dir OUT resumes it on any topology.",
    )
    p.add_argument("checkpoint", help="the old checkpoint.pt")
    p.add_argument("--out", help="run directory to write checkpoints/step_N into (default: the file's directory)")
    p.set_defaults(run=_cmd_convert)


def _cmd_convert(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        print(f"dalle-dist convert-checkpoint: unexpected arguments {extra}")
        return 2
    path = convert_checkpoint(args.checkpoint, args.out)
    print(json.dumps({"converted": str(args.checkpoint), "step_dir": str(path)}))
    return 0
