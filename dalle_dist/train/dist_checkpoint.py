"""Reshardable, atomic checkpoints for the distributed trainer, on ``torch.distributed.checkpoint`` (DCP).

Layout of ``<out_dir>/checkpoints/``::

    step_00000010/            a complete checkpoint (renamed into place only after every rank finished)
        .metadata, __*.distcp   DCP: model, optimizer and EMA tensors keyed by full parameter names
        trainer.pt              rank-independent state: step, LR schedule, config (torch.save, weights_only)
        rng_<rank>.pt           each rank's RNG states
        powersgd_*.pt           Σ over replicas of the PowerSGD error buffers, one file per (stage, shard) [P E.2]
    step_00000015.tmp/        a save in progress or interrupted by a crash: never read, removed by the next save

Tensors are keyed by the single-process names (``resblocks.7.attn.q_proj.weight``, ``exp_avg`` of it, ...), so a
checkpoint written on one topology loads on another: DCP reshards the DTensors on load.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (``.tmp`` directories of interrupted saves are ignored)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "trainer.pt").is_file()]
    return sorted(done, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, Any]) -> dict[str, Any]:
    # Flattened optimizer state keys every entry by parameter name ("state.<fqn>.exp_avg",
    # "param_groups.<fqn>.lr"): nested lists of groups would be keyed by group index, which collides across
    # pipeline stages whose groups hold different parameters.
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    return {
        "model": get_model_state_dict(model, options=opts),
        "optim": get_optimizer_state_dict(model, optimizer, options=opts),
        "ema": ema,
    }


def save_distributed(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, Any],
    trainer_state: dict[str, Any],
    rng: dict[str, Any],
    keep: int = 3,
    rank_files: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it. Writes ``step_N.tmp``, then rank 0 renames it to ``step_N``.

    A crash at any point leaves the previous complete checkpoint untouched and readable.
    """
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        tmp.mkdir()
    dist.barrier()
    dcp.save(_tensor_state(model, optimizer, ema), checkpoint_id=str(tmp))
    torch.save(rng, tmp / f"rng_{rank}.pt")
    for name, obj in (rank_files or {}).items():  # e.g. the PowerSGD error-buffer sums of one shard group
        torch.save(obj, tmp / name)
    dist.barrier()
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer.pt")  # its presence marks the checkpoint complete
        tmp.rename(final)
        for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_distributed(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Collective. Loads tensors in place (resharding as needed); returns (trainer_state, this rank's RNG or None).

    The RNG file of this rank exists only when the topology is unchanged; otherwise None is returned.
    """
    path = Path(path)
    state = _tensor_state(model, optimizer, ema)
    dcp.load(state, checkpoint_id=str(path))
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    set_model_state_dict(model, state["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=opts)
    trainer_state = torch.load(path / "trainer.pt", weights_only=True)
    rng_file = path / f"rng_{dist.get_rank()}.pt"
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return trainer_state, rng
