"""Processes and devices: torchrun's job, or one plain process as the 1-rank job of the same engine.

torchtitan always builds its mesh; so do we. Under torchrun the ranks rendezvous through ``env://``; a plain
``dalle-dist train-*`` process starts a 1-rank group on an in-process store, so every collective, the DeviceMesh
and DCP run the very code a cluster runs (on one rank they are copies and no-ops).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..devices import resolve_device


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(backend: str = "auto", device: str = "auto") -> tuple[torch.device, bool]:
    """Join (or start) the process group; returns (this rank's device, whether this call created the group).

    ``device`` is ``train.device``: ``auto`` takes CUDA when visible, ``cpu`` keeps a GPU machine on the CPU (gloo).
    Under torchrun each rank takes ``cuda:LOCAL_RANK``.
    """
    want = resolve_device(device, "--train.device")
    if want.type == "cuda" and under_torchrun():
        want = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if want.type == "cuda":
        torch.cuda.set_device(want)
    created = False
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if want.type == "cuda" else "gloo"
        if under_torchrun():
            dist.init_process_group(backend)
        else:  # one plain process: the 1-rank job, on a store that lives in this process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    return want, created


def close_distributed(created: bool) -> None:
    """Destroy the process group if this run created it (a caller's own group is left alone)."""
    if created and dist.is_initialized():
        dist.destroy_process_group()
