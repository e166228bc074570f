"""Numerics policies applied to models from outside: per-resblock gradient scaling, fp32 parameter classes,
16-bit values in fp32 storage and autocast, activation checkpointing, AdamW with fp32 (or bf16) moments
[P §2.4, App. D; docs/precision.md]. One process and many use the same policies and the same unscale protocol."""

from .grad_scaler import REST, ResblockGradScaler, branch_modules, grads_by_block, sync_finite_flags
from .optim import AdamW32, ShardedAdamW32, decay_groups
from .policy import (
    DTYPES,
    PrecisionPolicy,
    apply_activation_checkpointing,
    apply_precision,
    apply_stage_precision,
    keeps_fp32,
    resblock_modules,
    round_to_storage_,
)

__all__ = [
    "DTYPES",
    "REST",
    "AdamW32",
    "PrecisionPolicy",
    "ResblockGradScaler",
    "ShardedAdamW32",
    "apply_activation_checkpointing",
    "apply_precision",
    "apply_stage_precision",
    "branch_modules",
    "decay_groups",
    "grads_by_block",
    "keeps_fp32",
    "resblock_modules",
    "round_to_storage_",
    "sync_finite_flags",
]
