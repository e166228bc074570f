"""Export trained weights to one safetensors file + config (+ tokenizer) that generation loads.

``dalle-dist export --prior CKPT [--dvae CKPT] [--tokenizer FILE] --out DIR`` writes::

    DIR/model.safetensors   tensors "prior.<name>" and "dvae.<name>" (EMA weights by default [P A.2, B.2])
    DIR/config.json         {"prior": <PriorRunConfig>, "dvae": <DVAERunConfig>, "source": {...}}
    DIR/tokenizer.json      copied when given
    DIR/reranker/           a copy of a ``dalle-dist train-reranker`` directory, when given (generate --rerank)

Loading (:func:`load_export`) reads JSON and safetensors only: nothing is unpickled, so an export from an
untrusted source cannot run code. A prior checkpoint may be a single-process ``checkpoint.pt`` or a distributed
DCP step directory (any topology); the dVAE checkpoint is a ``checkpoint.pt`` from ``train-dvae``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import from_dict
from ..models.dvae import DiscreteVAE
from ..models.prior import DallePrior
from .checkpoint import load_checkpoint
from .dist_checkpoint import latest_checkpoint

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
RERANKER = "reranker"  # subdirectory generate --rerank looks in by default


def _from_trainer_checkpoint(path: Path, stage: str, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict]:
    state = load_checkpoint(path)
    if state.get("stage") != stage:
        raise ValueError(f"{path} holds a {state.get('stage')!r} checkpoint, not {stage!r}")
    weights = dict(state["model"])
    if use_ema:
        weights.update({k: v.to(weights[k].dtype) for k, v in state["ema"]["shadow"].items()})
    return weights, state["config"]


def _from_dcp(path: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a distributed checkpoint into full tensors in this one process (DCP reshards to one rank)."""
    import torch.distributed.checkpoint as dcp

    trainer_state = torch.load(path / "trainer.pt", weights_only=True)
    cfg = from_dict("prior", trainer_state["config"])
    with torch.device("meta"):
        template = DallePrior(cfg.model)
    template.to_empty(device="cpu")
    model_sd = template.state_dict()
    state: dict[str, Any] = {"model": model_sd}
    if use_ema:
        state["ema"] = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in model_sd.items()}
    dcp.load(state, checkpoint_id=str(path))
    weights = {k: state["ema"][k].to(v.dtype) if use_ema else v for k, v in model_sd.items()}
    return weights, trainer_state["config"]


def read_prior_weights(path: str | Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Full prior weights and run config from ``checkpoint.pt``, a DCP step dir, or a run dir (latest step)."""
    path = Path(path)
    if path.is_dir() and not (path / "trainer.pt").is_file():
        latest = latest_checkpoint(path)
        if latest is None and (path / "checkpoint.pt").is_file():
            path = path / "checkpoint.pt"
        elif latest is None:
            raise FileNotFoundError(f"no checkpoint found in {str(path)!r}")
        else:
            path = latest
    if path.is_dir():
        return _from_dcp(path, use_ema)
    return _from_trainer_checkpoint(path, "prior", use_ema)


def export(
    out: str | Path,
    prior: str | Path,
    dvae: str | Path | None = None,
    tokenizer: str | Path | None = None,
    use_ema: bool = True,
    reranker: str | Path | None = None,
) -> Path:
    if reranker is not None:  # checked before the (possibly long) read of the prior
        from ..rerank.train import CONFIG as RERANKER_CONFIG
        from ..rerank.train import WEIGHTS as RERANKER_WEIGHTS

        if not (Path(reranker) / RERANKER_WEIGHTS).is_file() or not (Path(reranker) / RERANKER_CONFIG).is_file():
            raise FileNotFoundError(f"{str(reranker)!r} is not a reranker directory (dalle-dist train-reranker --out)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prior_w, prior_cfg = read_prior_weights(prior, use_ema)
    tensors = {f"prior.{k}": v.contiguous() for k, v in prior_w.items()}
    config: dict[str, Any] = {"prior": prior_cfg, "source": {"prior": str(prior), "ema": use_ema}}
    if dvae is not None:
        dvae_w, dvae_cfg = _from_trainer_checkpoint(Path(dvae), "dvae", use_ema)
        tensors.update({f"dvae.{k}": v.contiguous() for k, v in dvae_w.items()})
        config["dvae"] = dvae_cfg
        config["source"]["dvae"] = str(dvae)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER)
        config["source"]["tokenizer"] = str(tokenizer)
    if reranker is not None:
        shutil.copytree(reranker, out / RERANKER, dirs_exist_ok=True)
        config["source"]["reranker"] = str(reranker)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "dalle_dist"})
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return out


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[DallePrior, DiscreteVAE | None, dict]:
    """(prior, dvae or None, config dict) from an export directory; safetensors + JSON only, no pickle."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{str(path)!r} is not an export: expected {WEIGHTS} and {CONFIG} (dalle-dist export)")
    config = json.loads((path / CONFIG).read_text())
    tensors = load_file(str(path / WEIGHTS), device=str(device))
    prior_cfg = from_dict("prior", config["prior"])
    with torch.device("meta"):
        prior = DallePrior(prior_cfg.model)
    prior.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("prior.")}, assign=True)
    dvae = None
    if "dvae" in config:
        dvae = DiscreteVAE(from_dict("dvae", config["dvae"]).model)
        dvae.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("dvae.")})
        dvae = dvae.to(device).eval()
    return prior.eval(), dvae, config
