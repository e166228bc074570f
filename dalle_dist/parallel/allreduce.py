"""The plain replica reduction (one fp32 all-reduce) and the pieces every replica reduction shares.

:class:`ReduceResult` is what both :func:`plain_allreduce` and :class:`~.powersgd.PowerSGDReducer` return
(``comm.replica_reduce = allreduce | powersgd``, :func:`~.powersgd.build_replica_reducer`); the process-group
helpers here also serve the PowerSGD reducer. :mod:`.powersgd` re-exports every public name.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup


@dataclass
class ReduceResult:
    """What a replica reduction hands to the optimizer step. Identical on every replica of the group."""

    grads: dict[str, Tensor]  # fp32, original shapes: mean (allreduce) or decompressed P̂·Qᵀ (powersgd), clipped
    global_norm: float  # ‖update‖ before clipping [P E.2(9)]; inf when not finite
    clip_coef: float  # factor already applied to ``grads``: min(1, max_norm / (norm + 1e-6)); 1 without clipping
    finite: bool  # False: every replica skips the parameter and moment update together [P E.2(10-11)]
    bytes_sent: dict[str, int]  # per-rank all-reduce payload: {"sent": this reduction, "uncompressed": fp32 all}

    def copy_into(self, targets: Mapping[str, Tensor]) -> None:
        """Write the reduced gradients into ``targets`` (e.g. ``{n: p.grad}``), casting to their dtype."""
        with torch.no_grad():
            for name, t in targets.items():
                t.copy_(self.grads[name].view_as(t))


# --------------------------------------------------------------------------------------------------
# Process-group helpers: group=None means the default group, or one local replica when none is initialised.
# --------------------------------------------------------------------------------------------------


def group_size(group: ProcessGroup | None) -> int:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_reduce_sum(t: Tensor, group: ProcessGroup | None, async_op: bool = False) -> Any:
    if t.numel() > 0 and group_size(group) > 1:
        return dist.all_reduce(t, group=group, async_op=async_op)
    return None


def _clip_coef(norm: float, max_norm: float | None) -> float:
    if not max_norm:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) else 0.0


def finite_rows(x: Tensor) -> Tensor:
    """(B, ...) → (B,) bool: no inf/NaN in each row. A sum is one pass where isfinite(x).all() is several; it
    also overflows for values near the fp32 maximum, where skipping the step is the right call anyway."""
    return torch.isfinite(x.reshape(x.shape[0], -1).sum(1))


def _split(flat: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].view(shape)
        offset += n
    return out


def plain_allreduce(
    grads: Mapping[str, Tensor], group: ProcessGroup | None = None, max_norm: float | None = 4.0
) -> ReduceResult:
    """The uncompressed replica reduction: one fp32 all-reduce of every gradient plus the nonfinite flag.

    The local flag rides in the same buffer (a sum of 0/1 is exact in fp32), so no extra collective is needed.
    """
    world = group_size(group)
    device = next(iter(grads.values())).device
    flat = torch.cat([g.detach().reshape(-1).float() for g in grads.values()] + [torch.zeros(1, device=device)])
    flat[-1] = (~finite_rows(flat[None, :-1])[0]).float()  # local nonfinite flag [P E.2(10)]
    _all_reduce_sum(flat, group)
    flat[:-1] /= world
    norm = float(torch.linalg.vector_norm(flat[:-1], dtype=torch.float64))  # fp64 sum over many elements
    finite = float(flat[-1]) == 0 and math.isfinite(norm)
    coef = _clip_coef(norm, max_norm)
    if coef < 1.0:
        flat[:-1] *= coef
    nbytes = 4 * flat.numel()
    shapes = {name: g.shape for name, g in grads.items()}
    bytes_sent = {"sent": nbytes, "uncompressed": nbytes}
    return ReduceResult(_split(flat[:-1], shapes), norm if finite else math.inf, coef, finite, bytes_sent)


class AllReduceReducer:
    """:func:`plain_allreduce` with the reducer interface (no state)."""

    def __init__(self, group: ProcessGroup | None = None, max_norm: float | None = 4.0) -> None:
        self.group, self.max_norm = group, max_norm

    def reduce(self, grads: Mapping[str, Tensor]) -> ReduceResult:
        return plain_allreduce(grads, self.group, self.max_norm)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
