"""Parameter and memory planner: builds the models on the meta device (no memory) and counts.

``dalle-dist plan --prior 12B --dvae openai --json``. The paper's figures to check against: 12B effective
parameters = 12·64·3968² ≈ 12.09e9 [P Table 1], "about 24 GB of memory when stored in 16-bit precision"
[P §2.5]; the dVAE encoder 53,786,240 and decoder 43,829,766 parameters [C].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import model_config
from .models.dvae import DiscreteVAE
from .models.prior import DallePrior, effective_params


def _fp32_policy(name: str, p: nn.Parameter) -> bool:
    """Parameters the paper keeps in fp32: gains, biases, embeddings, unembeddings [P D.2]."""
    return p.ndim < 2 or name.startswith("embed.") or name.startswith("head.")


def _bytes(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    fp32_part = sum(p.numel() for n, p in model.named_parameters() if _fp32_policy(n, p))
    return {"fp16": 2 * total, "fp32": 4 * total, "mixed": 2 * (total - fp32_part) + 4 * fp32_part}


def plan_prior(flavor: str) -> dict[str, Any]:
    cfg = model_config("prior", flavor)
    with torch.device("meta"):
        model = DallePrior(cfg)
    total = sum(p.numel() for p in model.parameters())
    groups = {"embed": 0, "resblocks": 0, "head": 0}
    for name, p in model.named_parameters():
        groups[name.split(".", 1)[0]] += p.numel()
    weights = _bytes(model)
    return {
        "flavor": flavor,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_resblocks": len(model.resblocks),
        "seq_len": cfg.seq_len,
        "params_total": total,
        "params_effective": effective_params(model),
        "params_by_part": groups,
        "weights_bytes": weights,
        "weights_gb_fp16": weights["fp16"] / 1e9,
        "weights_gb_fp32": weights["fp32"] / 1e9,
    }


def plan_dvae(flavor: str) -> dict[str, Any]:
    cfg = model_config("dvae", flavor)
    with torch.device("meta"):
        model = DiscreteVAE(cfg)
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters())
    return {
        "flavor": flavor,
        "image_size": cfg.image_size,
        "grid": cfg.grid,
        "vocab_size": cfg.vocab_size,
        "encoder_params": enc,
        "decoder_params": dec,
        "params_total": enc + dec,
        "weights_bytes": {"fp16": 2 * (enc + dec), "fp32": 4 * (enc + dec)},
    }


def plan(prior: str | None = None, dvae: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if prior is not None:
        out["prior"] = plan_prior(prior)
    if dvae is not None:
        out["dvae"] = plan_dvae(dvae)
    return out


def format_plan(result: dict[str, Any]) -> str:
    """Human-readable summary for ``dalle-dist plan`` without ``--json``."""
    lines = []
    if "prior" in result:
        p = result["prior"]
        lines += [
            f"prior {p['flavor']}: {p['n_layers']} layers × d={p['d_model']} ({p['n_heads']} heads), "
            f"{p['n_resblocks']} resblocks, sequence {p['seq_len']}",
            f"  parameters: total {p['params_total']:,}  effective (resblock matrices) {p['params_effective']:,}",
            f"  weights: {p['weights_gb_fp16']:.2f} GB fp16, {p['weights_gb_fp32']:.2f} GB fp32, "
            f"{p['weights_bytes']['mixed'] / 1e9:.2f} GB with fp32 gains/biases/embeddings [P D.2]",
        ]
    if "dvae" in result:
        d = result["dvae"]
        lines += [
            f"dvae {d['flavor']}: {d['image_size']} px → {d['grid']}×{d['grid']} tokens of {d['vocab_size']} codes",
            f"  encoder {d['encoder_params']:,} params, decoder {d['decoder_params']:,} params",
        ]
    return "\n".join(lines)
