"""FSDP2 on the ``shard`` mesh dim, applied from outside to pipeline stages [P §2.5, Fig. 5].

Per resblock, then per stage: while one resblock computes, FSDP all-gathers the next one's shards and frees them
after use; gradients are reduce-scattered so each rank keeps its shard's gradient, averaged over the shard group.
With 16-bit numerics each Linear that holds a 16-bit weight is its own unit with a 16-bit all-gather (FSDP2 wants
one dtype per unit; see ``precision/policy.py:apply_stage_precision``), while LayerNorms, embeddings and the head
stay fp32.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .pipeline import PriorStage


def low_precision_modules(block: nn.Module, low_params: set[int]) -> list[nn.Module]:
    """Submodules of a resblock that directly own a 16-bit parameter (its Linears): one FSDP unit each."""
    return [m for m in block.modules() if m is not block and any(id(p) in low_params for p in m.parameters(False))]


def low_precision_policy(dtype: torch.dtype):  # noqa: ANN201 - torch.distributed.fsdp imported lazily
    """16-bit all-gather and compute, fp32 reduce-scatter and gradient accumulation; autocast owns the inputs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def apply_fsdp(
    stages: Iterable[PriorStage],
    shard_mesh,  # noqa: ANN001 - a 1-D DeviceMesh (torch.distributed imported lazily)
    low_param_names: Iterable[str] = (),
    dtype: torch.dtype | None = None,
) -> None:
    """``fully_shard`` every resblock (its 16-bit Linears as their own units), then every stage, on ``shard_mesh``.

    ``low_param_names`` are the stage-level names of the parameters that compute in ``dtype`` (16-bit).
    """
    from torch.distributed.fsdp import fully_shard

    names = set(low_param_names)
    for stage in stages:
        low = {id(p) for n, p in stage.named_parameters() if n in names}
        for block in stage.resblocks.values():
            if low and dtype is not None:
                for module in low_precision_modules(block, low):
                    fully_shard(module, mesh=shard_mesh, mp_policy=low_precision_policy(dtype))
            fully_shard(block, mesh=shard_mesh)
        fully_shard(stage, mesh=shard_mesh)
