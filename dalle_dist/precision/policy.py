"""Which tensors are 16-bit, applied to a model from outside [P §2.4, D.2; docs/precision.md].

- Prior: weight matrices inside the resblocks are stored in fp16 / bf16 and each resblock's forward runs under
  autocast in that dtype. Gains, biases, embeddings and unembeddings stay fp32 (parameters, gradients and Adam
  moments) [P D.2]; the logits are fp32 because the head turns autocast off; the residual stream is fp32 because
  the embeddings are fp32 and every branch output is added to it in fp32.
- dVAE: parameters stay fp32; ``DiscreteVAE.set_compute_dtype`` runs its convs in 16 bits (the codebook-sized
  convs stay fp32 [C]); fp16 uses one global loss scale [P A.2].

Forward wrappers (autocast, activation checkpointing) are set as an instance attribute ``forward`` on each resblock,
so parameter names, state-dict keys and the resblocks' forward hooks (the gradient scaler's) are unchanged: the
hooks run outside the wrapped region, once per forward, and are not replayed by the recomputation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import PrecisionConfig

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class PrecisionPolicy:
    """What :func:`apply_precision` did to a model."""

    dtype: torch.dtype  # storage of the 16-bit weight matrices and compute dtype of the resblock branches
    scaling: str  # "per_resblock" (prior, fp16) | "global" (dVAE, fp16: torch.amp.GradScaler) | "none"
    fp32_params: list[str] = field(default_factory=list)  # gains, biases, embeddings, unembeddings [P D.2]
    low_params: list[str] = field(default_factory=list)  # weight matrices stored in ``dtype``


def keeps_fp32(name: str, param: torch.Tensor) -> bool:
    """Gains, biases, embeddings and unembeddings stay fp32 [P D.2].

    For the prior: everything outside ``resblocks.`` (``embed.*`` and ``head.*``: embeddings, final LayerNorm,
    unembeddings) and every parameter with fewer than 2 dims (LayerNorm gains/biases, Linear biases).
    """
    return not name.startswith("resblocks.") or param.ndim < 2


def resblock_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The resblocks of a prior (``model.resblocks``) or a dVAE (its encoder/decoder blocks, by module path)."""
    blocks = getattr(model, "resblocks", None)
    if isinstance(blocks, nn.ModuleDict):
        return dict(blocks.items())
    found = {n: m for n, m in model.named_modules() if hasattr(m, "res_path") and hasattr(m, "id_path")}
    if not found:
        raise TypeError(f"{type(model).__name__} has neither `resblocks` nor dVAE resblocks (res_path + id_path)")
    return found


def _wrap_forward(module: nn.Module, tag: str, make: Callable[[Callable], Callable]) -> None:
    """Shadow ``module.forward`` by ``make(module.forward)``; idempotent per ``tag``."""
    tags = module.__dict__.get("_precision_wraps", ())
    if tag in tags:
        return
    module.forward = functools.wraps(module.forward)(make(module.forward))
    module.__dict__["_precision_wraps"] = (*tags, tag)


def _autocast(dtype: torch.dtype) -> Callable[[Callable], Callable]:
    def make(forward: Callable) -> Callable:
        def run(x: torch.Tensor, *args, **kwargs):
            # Autocast lets 16-bit weights meet fp32 biases and inputs in F.linear; LayerNorm keeps fp32 gains.
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                return forward(x, *args, **kwargs)

        return run

    return make


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)  # sampling: nothing to save
        # Non-reentrant: supports kwargs and restores the autocast state when it recomputes.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@torch.no_grad()
def apply_precision(model: nn.Module, cfg: PrecisionConfig) -> PrecisionPolicy:
    """Set a model's storage and compute dtypes from ``cfg`` in place; call before building the optimizer.

    Prior (has ``resblocks``): weight matrices in the resblocks → ``cfg.dtype``, everything in :func:`keeps_fp32`
    stays fp32, each resblock's forward runs under autocast. dVAE (has ``set_compute_dtype``): convs compute in
    ``cfg.dtype``, parameters stay fp32.
    """
    cfg.validate()
    dtype = DTYPES[cfg.dtype]
    wants_scaling = dtype == torch.float16 and cfg.grad_scaling != "none"  # bf16 has fp32's exponent range
    if hasattr(model, "set_compute_dtype"):
        model.set_compute_dtype(None if dtype == torch.float32 else dtype)
        names = [n for n, _ in model.named_parameters()]
        return PrecisionPolicy(dtype, "global" if wants_scaling else "none", fp32_params=names)
    if not isinstance(getattr(model, "resblocks", None), nn.ModuleDict):
        raise TypeError(f"apply_precision does not know {type(model).__name__}: expected a prior or a dVAE")
    policy = PrecisionPolicy(dtype, "per_resblock" if wants_scaling else "none")
    for name, p in model.named_parameters():
        if keeps_fp32(name, p) or dtype == torch.float32:
            p.data = p.data.float()
            policy.fp32_params.append(name)
        else:
            p.data = p.data.to(dtype)  # in place on the Parameter, as Module.half() does
            policy.low_params.append(name)
    if dtype != torch.float32:
        for block in model.resblocks.values():
            _wrap_forward(block, "autocast", _autocast(dtype))
    return policy


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each resblock's activations in the backward pass [P §2.4] (``torch.utils.checkpoint``).

    Only the block's input is saved. Composes with :func:`apply_precision` (the recomputation reruns the autocast
    region) and with the gradient scaler (its hooks sit outside the checkpointed region and run once).
    """
    for block in resblock_modules(model).values():
        _wrap_forward(block, "checkpoint", _checkpointed)


def apply_stage_precision(stage: nn.Module, cfg: PrecisionConfig) -> PrecisionPolicy:
    """The engine's numerics on a prior (or one pipeline stage of it): :func:`apply_precision`, storage in fp32.

    FSDP2 (torch 2.13) refuses a unit whose parameters mix dtypes, and every Linear of a resblock holds a 16-bit
    weight and an fp32 bias [P D.2]; so every shard is stored in fp32 while its *value* is a 16-bit number (the run
    starts from exactly the 16-bit weights) and the resblock computes under 16-bit autocast. After each update
    :func:`round_to_storage_` puts the weight matrices back on the 16-bit grid unless ``master_weights`` keeps the
    fp32 values. One process (the 1-rank topology) stores the same way, so both run the same arithmetic; see
    docs/precision.md for the bytes this costs. Call before FSDP and before the optimizer is built.
    """
    policy = apply_precision(stage, cfg)  # rounds the weight matrices to 16 bits and wraps forwards in autocast
    low = set(policy.low_params)
    for name, p in stage.named_parameters():
        if name in low:
            p.data = p.data.float()  # fp32 storage holding a 16-bit value
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(stage)  # after autocast: the recomputation reruns the autocast region
    return policy


@torch.no_grad()
def round_to_storage_(tensors: Iterable[torch.Tensor], dtype: torch.dtype) -> None:
    """Round fp32 tensors to the nearest ``dtype`` value in place: 16-bit weights without master copies."""
    for t in tensors:
        t.copy_(t.to(dtype))
