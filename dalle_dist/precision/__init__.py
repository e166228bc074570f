"""Numerics policies applied to models from outside: per-resblock gradient scaling, fp32 parameter classes,
16-bit storage and autocast, activation checkpointing, an AdamW with fp32 state [P §2.4, App. D; docs/precision.md]."""

from .grad_scaler import REST, ResblockGradScaler, branch_modules, sync_finite_flags
from .optim import AdamW32
from .policy import (
    DTYPES,
    PrecisionPolicy,
    apply_activation_checkpointing,
    apply_precision,
    keeps_fp32,
    resblock_modules,
)

__all__ = [
    "DTYPES",
    "REST",
    "AdamW32",
    "PrecisionPolicy",
    "ResblockGradScaler",
    "apply_activation_checkpointing",
    "apply_precision",
    "branch_modules",
    "keeps_fp32",
    "resblock_modules",
    "sync_finite_flags",
]
