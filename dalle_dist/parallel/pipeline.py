"""Pipeline stages of the prior on ``torch.distributed.pipelining``.

The prior is split by resblocks: stage 0 also holds the embeddings, the last stage the head (logits) and the
loss. Stage modules keep the full model's parameter names (``embed.*``, ``resblocks.K.*``, ``head.*``) so
checkpoints written on one topology load on another, and so initialisation by name gives every topology the
same weights. The paper has no pipeline (spec §4); with pp = 1 this is its scheme.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PriorModelConfig
from ..models.prior import DallePrior

SCHEDULES = ("1f1b", "interleaved1f1b", "gpipe")
PP_RESHARD = ("step", "microbatch")  # parallel.pp_reshard: when FSDP reshards a stage and reduce-scatters its grads


class ShardedStageHolder(nn.Module):
    """A plain module around an FSDP-wrapped stage, so ``torch.distributed.pipelining`` treats it as unsharded.

    Handed a ``FSDPModule``, pipelining sets ``set_reshard_after_backward(False)`` and
    ``set_requires_gradient_sync(False)`` until the last microbatch: every parameter of the stage stays
    all-gathered and its gradient unsharded (fp32) for the whole step. Behind this holder each microbatch's
    backward is an ordinary FSDP2 backward: the resblocks reshard and reduce-scatter as they finish, and FSDP2
    accumulates the reduce-scattered gradients into the shards (``parallel.pp_reshard: microbatch``).
    """

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *args: Tensor) -> Any:
        return self.stage(*args)


class PriorStage(nn.Module):
    """A contiguous range of the prior's resblocks, plus the embeddings (first) and/or the head (last).

    forward(text, image) on the first stage, forward(h) on the others; the last returns (text_logits,
    image_logits) in fp32, the others the residual stream h (B, T, d).
    """

    def __init__(self, model: DallePrior, keys: list[str], first: bool, last: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.keys = list(keys)
        self.embed = model.embed if first else None
        self.resblocks = nn.ModuleDict({k: model.resblocks[k] for k in keys})
        self.head = model.head if last else None

    @property
    def is_first(self) -> bool:
        return self.embed is not None

    @property
    def is_last(self) -> bool:
        return self.head is not None

    def forward(self, *args: Tensor) -> Any:
        h = self.embed(*args) if self.embed is not None else args[0]  # (B, T, d)
        for block in self.resblocks.values():
            h = h + block(h)  # residual stream; the branch alone is wrapped by numerics policies
        if self.head is not None:
            return self.head(h)  # (B, t-1, V_txt), (B, n, V_img)
        return h


def split_resblocks(keys: list[str], n_chunks: int) -> list[list[str]]:
    """Contiguous, balanced chunks of resblock keys (earlier chunks take the remainder)."""
    if n_chunks < 1 or n_chunks > len(keys):
        raise ValueError(
            f"cannot split {len(keys)} resblocks into {n_chunks} pipeline chunks; use at most {len(keys)} stages"
        )
    base, extra = divmod(len(keys), n_chunks)
    out, i = [], 0
    for c in range(n_chunks):
        n = base + (1 if c < extra else 0)
        out.append(keys[i : i + n])
        i += n
    return out


def stage_indices(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Global stage indices held by a pp rank: the interleaved (looping) placement r, r + pp, r + 2·pp, ..."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def build_stage_modules(
    model: DallePrior, pp_rank: int, pp: int, virtual_stages: int = 1
) -> tuple[list[PriorStage], list[int]]:
    """The stage modules of one pp rank (sharing parameters with ``model``) and their global stage indices."""
    n_stages = pp * virtual_stages
    chunks = split_resblocks(list(model.resblocks.keys()), n_stages)
    indices = stage_indices(pp_rank, pp, virtual_stages)
    modules = [PriorStage(model, chunks[i], first=i == 0, last=i == n_stages - 1) for i in indices]
    return modules, indices


@dataclass
class PipelineParts:
    """This pp rank's stage modules (parameters shared with the model they were cut from) and its schedule."""

    stages: list[PriorStage]
    stage_ids: list[int]
    n_stages: int
    schedule: Any = None

    def build_schedule(
        self,
        device: torch.device,
        group: Any,
        n_microbatches: int,
        loss_fn: Callable | None,
        schedule: str = "1f1b",
        reshard: str = "step",
    ) -> Any:
        """Wrap the (already sharded, materialised) stages in ``PipelineStage`` objects and a schedule.

        ``reshard="microbatch"`` hands pipelining each stage behind a :class:`ShardedStageHolder`.
        """
        from torch.distributed.pipelining import PipelineStage

        mods = [ShardedStageHolder(s) if reshard == "microbatch" else s for s in self.stages]
        pipe = [PipelineStage(m, i, self.n_stages, device, group=group) for m, i in zip(mods, self.stage_ids)]
        self.schedule = build_schedule(pipe, n_microbatches, loss_fn, schedule)
        return self.schedule


def apply_pipeline(model: DallePrior, pp_rank: int, pp: int, virtual_stages: int = 1) -> PipelineParts:
    """Split a (meta-device) prior into pipeline stages by resblocks: embeddings in the first, head and loss in
    the last; rank ``pp_rank`` keeps stages pp_rank, pp_rank + pp, … (interleaved when virtual_stages > 1).

    Two phases, as torchtitan does: cut here, then materialise / apply numerics and FSDP to ``parts.stages``,
    then ``parts.build_schedule(...)`` (1F1B, interleaved 1F1B or GPipe over n microbatches).
    """
    stages, ids = build_stage_modules(model, pp_rank, pp, virtual_stages)
    return PipelineParts(stages, ids, pp * virtual_stages)


def pack_targets(text_targets: Tensor, image: Tensor) -> Tensor:
    """One (B, t-1 + n) long tensor: the pipeline schedule splits a single target tensor into microbatches."""
    return torch.cat([text_targets, image], dim=1)


def make_loss_fn(
    cfg: PriorModelConfig, n_text: Tensor, n_image: Tensor, scale: float = 1.0, parts: list | None = None
) -> Callable:
    """Loss of one microbatch normalised by the whole global batch's token counts.

    [P §2.2] averages each modality's cross-entropy over its tokens in the batch; [P D.3] divides by the overall
    batch. Summing sum-CE / global-count over microbatches and ranks gives exactly the single-process loss, which
    is what makes every topology agree. ``scale`` multiplies the loss for backward (e.g. the data-parallel degree,
    undoing the averaging of gradient reductions). ``parts`` collects each microbatch's (text CE, image CE)
    contributions to the per-modality losses, detached, for logging.
    """

    def loss_fn(output: tuple[Tensor, Tensor], target: Tensor) -> Tensor:
        text_logits, image_logits = output
        t = text_logits.shape[1]
        text_sum = F.cross_entropy(text_logits.flatten(0, 1), target[:, :t].flatten(), reduction="sum")
        image_sum = F.cross_entropy(image_logits.flatten(0, 1), target[:, t:].flatten(), reduction="sum")
        text_ce = text_sum / n_text.clamp(min=1)
        image_ce = image_sum / n_image
        if parts is not None:
            parts.append(torch.stack([text_ce.detach(), image_ce.detach()]))
        return (cfg.text_loss_weight * text_ce + cfg.image_loss_weight * image_ce) * scale

    return loss_fn


def build_schedule(stages: list[Any], n_microbatches: int, loss_fn: Callable | None, schedule: str = "1f1b") -> Any:
    """A torch.distributed.pipelining schedule over this rank's ``PipelineStage`` objects.

    Gradients are not rescaled by the number of microbatches (``scale_grads=False``): the loss of each
    microbatch is already normalised by the global token counts.
    """
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if schedule == "1f1b":
        if len(stages) != 1:
            raise ValueError("schedule=1f1b takes one stage per rank; use interleaved1f1b for virtual stages")
        return Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if schedule == "gpipe":
        return ScheduleGPipe(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if schedule == "interleaved1f1b":
        return ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {SCHEDULES}")


def bubble_fraction(pp: int, n_microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of a 1F1B pipeline: (p − 1) / (v·m + p − 1) (interleaving divides the bubble by v)."""
    if pp <= 1:
        return 0.0
    return (pp - 1) / (virtual_stages * n_microbatches + pp - 1)
