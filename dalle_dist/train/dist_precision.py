"""16-bit numerics of the distributed prior engine: storage layout under FSDP2, per-resblock gradient scales
across pipeline stages, shards and replicas [P §2.4, App. D, E.2; docs/distributed.md "16-bit numerics"].

Layout. FSDP2 (torch 2.13) refuses one FSDP unit whose trainable parameters have mixed dtypes ("FSDP expects
uniform original parameter dtype"), and a resblock mixes 16-bit weight matrices with fp32 gains and biases
[P D.2]; every Linear even holds both. So the engine keeps the **sharded storage in fp32** for every parameter and
gets the 16-bit numerics from:

- the values: after each update the weight matrices are rounded to the 16-bit grid (:func:`round_to_storage_`),
  unless ``precision.master_weights`` keeps the fp32 values, so the weights evolve exactly like the single-process
  trainer's 16-bit weights (``AdamW32``: update in fp32, rounded into 16 bits);
- the compute: each resblock's branch runs under autocast in the 16-bit dtype (``apply_precision``);
- the communication: each Linear of a resblock is its own FSDP unit with ``MixedPrecisionPolicy(param_dtype=16-bit,
  reduce_dtype=fp32)``, so its all-gather moves 16-bit values [P Fig. 5] and the gradients are reduce-scattered and
  accumulated over microbatches in fp32. The Linear's bias is gathered in 16 bits too, which changes nothing:
  autocast casts it to 16 bits for ``F.linear`` anyway. LayerNorm gains and biases (the resblock's own unit), the
  embeddings and the head (the stage's unit) stay fp32 end to end [P D.2].

The gradient shards that FSDP leaves are therefore fp32 and still multiplied by their resblock's scale s_k. They
are unscaled in place, in fp32 (no underflow), before the replica reduction (all-reduce or PowerSGD's error buffer)
and the global-norm clip, as the paper does after its reduce-scatter [P E.2(2)]; the optimizer then gets fp32,
unscaled, clipped gradients (:class:`ShardedAdamW32`, whose moments of the 16-bit parameters may be bf16).
Deviation: 4 bytes of sharded storage per 16-bit parameter instead of 2 (what ``master_weights: true`` costs in one
process).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..config import PrecisionConfig
from ..precision import (
    REST,
    AdamW32,
    PrecisionPolicy,
    ResblockGradScaler,
    apply_activation_checkpointing,
    apply_precision,
)


def prepare_stage(stage: nn.Module, cfg: PrecisionConfig) -> PrecisionPolicy:
    """``apply_precision`` on one pipeline stage (autocast per resblock, 16-bit values), storage back in fp32.

    Call before FSDP. The 16-bit parameters hold exactly representable 16-bit values from here on, so the run
    starts from the single-process trainer's 16-bit weights; ``policy.low_params`` names them.
    """
    policy = apply_precision(stage, cfg)  # rounds the weight matrices to 16 bits and wraps forwards in autocast
    low = set(policy.low_params)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if name in low:
                p.data = p.data.float()  # fp32 storage holding a 16-bit value: FSDP2 units need one dtype
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(stage)  # after autocast: the recomputation reruns the autocast region
    return policy


@torch.no_grad()
def round_to_storage_(tensors: Iterable[Tensor], dtype: torch.dtype) -> None:
    """Round fp32 tensors to the nearest ``dtype`` value in place: the 16-bit storage without master weights."""
    for t in tensors:
        t.copy_(t.to(dtype))


class ShardedAdamW32(AdamW32):
    """``AdamW32`` over the engine's fp32 storage: a parameter's moments follow its *logical* precision.

    ``AdamW32`` picks ``moments_dtype`` for parameters stored in 16 bits; here every shard is stored in fp32, so the
    16-bit ones are named by ``low`` instead (bf16 moments with ``precision.moments_dtype=bf16``, the paper's 4 bytes
    per parameter [P B.2]). The weights themselves are fp32 tensors, so the update is applied to them in place and
    the engine rounds them to the 16-bit grid afterwards (:func:`round_to_storage_`).
    """

    def __init__(self, params: Iterable, low: Iterable[Tensor], **kwargs) -> None:  # noqa: ANN003 - AdamW32's
        self._low = {id(p) for p in low}
        super().__init__(params, **kwargs)

    def _moment_dtype(self, p: Tensor) -> torch.dtype:
        return self.moments_dtype if id(p) in self._low else torch.float32


class ShardedResblockGradScaler(ResblockGradScaler):
    """:class:`ResblockGradScaler` over a model split into pipeline stages and FSDP shards.

    Built with **all** resblock keys of the full model, so every rank holds the same flags, scales and update
    count [P E.2(10)]; hooks go only on the resblocks this rank holds, and resblocks held elsewhere count as
    finite in this rank's flags (their owners report them). Gradients are unscaled on the local fp32 shards.
    """

    def attach_local(self, blocks: Mapping[str, nn.Module]) -> list[RemovableHandle]:
        """Scale/unscale-and-filter hooks [P Fig. 4] on this rank's resblocks (a subset of ``self.keys``)."""
        unknown = [k for k in blocks if k not in self.scales]
        if unknown:
            raise KeyError(f"resblocks {unknown} are not among the scaler's keys")
        handles = []
        for key, block in blocks.items():
            handles.append(block.register_forward_pre_hook(functools.partial(self._enter, key), with_kwargs=True))
            handles.append(block.register_forward_hook(functools.partial(self._leave, key)))
        return handles

    @torch.no_grad()
    def unscale_local_(self, grads: Mapping[str, list[Tensor]]) -> tuple[dict[str, bool], dict[str, int]]:
        """Divide each local fp32 gradient shard of resblock k by the s_k its forward used; flag nonfinite ones.

        ``grads`` maps resblock keys (and ``REST``) to this rank's local gradient tensors, which must be fp32.
        Returns (flags for every key and ``REST``, this rank's filter counts per key since the last call).
        """
        flags = dict.fromkeys([*self.keys, REST], True)
        checks: list[tuple[str, Tensor]] = []
        for key, tensors in grads.items():
            if not tensors:
                continue
            if key != REST:
                if key not in self._used:
                    raise RuntimeError(f"resblock {key} has gradients but no scaled forward was recorded")
                inv = 1.0 / self._used[key]
                for g in tensors:
                    if g.dtype != torch.float32:
                        raise TypeError(f"resblock {key}: gradient shard is {g.dtype}; unscaling needs fp32")
                    g.mul_(inv)  # in fp32: the unscaled value cannot underflow [P E.2(2)]
            checks.append((key, torch.stack([torch.isfinite(g).all() for g in tensors]).all()))
        if checks:
            for (key, _), ok in zip(checks, torch.stack([c for _, c in checks]).tolist()):  # one host sync
                flags[key] = bool(ok)
        counts = dict.fromkeys(self.keys, 0)
        if self._filtered:
            values = torch.stack([c.cpu() for c in self._filtered.values()]).tolist()
            counts.update(zip(self._filtered, map(int, values)))
            for c in self._filtered.values():
                c.zero_()
        self._used.clear()
        return flags, counts

    def record(self, filtered: Mapping[str, int], grad_norms: Mapping[str, float]) -> None:
        """Global measurements of this step for :meth:`telemetry` (summed counts, unscaled global norms)."""
        self._last_filtered = dict.fromkeys(self.keys, 0) | dict(filtered)
        self._grad_norms = dict.fromkeys([*self.keys, REST], 0.0) | dict(grad_norms)
