"""Build the prior for one rank of a topology, in the fixed order torchtitan composes it [docs/distributed.md].

1. the whole prior on the meta device (no memory), its init seed drawn from ``train.seed``;
2. this pp rank's stage modules cut out of it (``apply_pipeline``), materialised and initialised by parameter
   name, so every topology starts from the one-process weights (skipped on the meta device: the planner);
3. numerics per stage (``apply_stage_precision``): 16-bit values in fp32 storage, autocast, checkpointing;
   the trainer then attaches its gradient scaler's hooks (before FSDP wraps the modules);
4. FSDP2 per resblock (and per 16-bit Linear), per embedding and head, then per stage, on the ``shard`` mesh dim,
   fc2 cut along ``parallel.fc2_shard_dim`` [P Fig. 5, Table 2].

The trainer and ``plan --dry-run`` both call :func:`build_prior_parts` and :func:`apply_prior_fsdp`, so what the
planner measures is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import PriorRunConfig
from ..models.prior import DallePrior, init_prior_parameters
from ..precision import PrecisionPolicy, apply_stage_precision
from .fsdp import apply_fsdp
from .pipeline import PipelineParts, PriorStage, apply_pipeline
from .topology import Topology


class StageView(nn.Module):
    """A rank's stages seen as one module with the one-process names (``embed``, ``resblocks.K``, ``head``).

    Checkpoints and the EMA key tensors by these names, so they load on any topology. Holds references only, so
    it stays valid through FSDP's in-place wrapping.
    """

    def __init__(self, stages: list[PriorStage]) -> None:
        super().__init__()
        self.embed = next((s.embed for s in stages if s.embed is not None), None)
        self.resblocks = nn.ModuleDict({k: b for s in stages for k, b in s.resblocks.items()})
        self.head = next((s.head for s in stages if s.head is not None), None)


@dataclass
class PriorParts:
    """One rank's share of the prior: the meta model it was cut from, its stages, their view and numerics."""

    meta_model: DallePrior  # the whole model's structure (meta device): resblock keys, targets(), config
    pipeline: PipelineParts
    view: StageView
    policy: PrecisionPolicy  # dtype and scaling of the run; low_params: this rank's 16-bit parameter names
    cfg: PriorRunConfig  # the run config it was built from

    @property
    def stages(self) -> list[PriorStage]:
        return self.pipeline.stages


def build_prior_parts(cfg: PriorRunConfig, topology: Topology, pp_rank: int, device: torch.device) -> PriorParts:
    """Steps 1–3 for pp rank ``pp_rank``; on ``device`` (the meta device builds shapes only)."""
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        meta_model = DallePrior(cfg.model)
    pipeline = apply_pipeline(meta_model, pp_rank, topology.pp, cfg.parallel.virtual_stages)
    if device.type != "meta":
        for stage in pipeline.stages:
            stage.to_empty(device=device)
            init_prior_parameters(stage.named_parameters(), cfg.model, meta_model.init_seed)
    policies = [apply_stage_precision(stage, cfg.precision) for stage in pipeline.stages]
    low = [n for p in policies for n in p.low_params]
    fp32 = [n for p in policies for n in p.fp32_params]
    policy = PrecisionPolicy(policies[0].dtype, policies[0].scaling, fp32_params=fp32, low_params=low)
    return PriorParts(meta_model, pipeline, StageView(pipeline.stages), policy, cfg)


def apply_prior_fsdp(parts: PriorParts, topology: Topology, shard_mesh) -> None:  # noqa: ANN001 - DeviceMesh
    """Step 4: FSDP2 on the ``shard`` dim when there is more than one shard (one shard: plain tensors)."""
    if topology.shard > 1:
        par = parts.cfg.parallel
        apply_fsdp(parts.stages, shard_mesh, parts.policy.low_params, parts.policy.dtype, par.fc2_shard_dim)
