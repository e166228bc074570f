"""Run metrics: JSONL always, Weights & Biases when asked; throughput and an MFU estimate.

wandb runs offline unless ``train.wandb = online`` (``WANDB_MODE`` in the environment wins; the tests set it to
``disabled``); offline runs sync later with ``wandb sync``. Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import PriorModelConfig


def prior_flops_per_token(cfg: PriorModelConfig) -> float:
    """Training FLOPs per token: 6·N for the resblock matrices plus attention scores and values.

    6·N_eff (forward 2·N, backward 4·N) with N_eff = 12·L·d² [P Table 1], plus 12·L·T·d for QKᵀ and AV over a
    dense causal context of T (the usual PaLM-style estimate; the sparse masks do less, so this is an upper
    bound on the work a dense kernel performs).
    """
    n_eff = 12 * cfg.n_layers * cfg.d_model**2
    return 6.0 * n_eff + 12.0 * cfg.n_layers * cfg.seq_len * cfg.d_model


def throughput(
    cfg: PriorModelConfig, global_batch: int, step_seconds: float, world_size: int, peak_flops: float
) -> dict[str, float]:
    """tokens/s over the whole job, achieved TFLOP/s per device, and MFU when the device peak is known."""
    tokens = global_batch * cfg.seq_len
    tok_s = tokens / max(step_seconds, 1e-9)
    flops_per_device = tok_s * prior_flops_per_token(cfg) / world_size
    out = {"tokens_per_s": tok_s, "tflops_per_device": flops_per_device / 1e12}
    if peak_flops > 0:
        out["mfu"] = flops_per_device / peak_flops
    return out


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl``; mirrors to wandb when enabled."""

    def __init__(self, out_dir: str | Path, config: dict[str, Any], mode: str = "offline", name: str = "") -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        self.wandb = None
        mode = os.environ.get("WANDB_MODE", mode)
        if mode != "disabled":
            try:
                import wandb
            except ImportError:  # optional: JSONL is the record of truth
                print("[dalle_dist] wandb is not installed; logging to metrics.jsonl only", flush=True)
            else:
                self.wandb = wandb.init(
                    project="dalle_dist", name=name or None, dir=str(self.path.parent), mode=mode, config=config
                )

    def log(self, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(metrics.get("step", 0)))

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
