"""``dalle-dist plan --dry-run``: per-rank memory, pipeline bubble and replica traffic of a run, by simulation.

The run is a ``PriorRunConfig``: the one ``build_config("prior", files, overrides)`` gives the trainer's launcher
(``plan --config``), or the one the options describe (:func:`~dalle_dist.plan_build.prior_run_config`). It is
checked by the trainer's ``check_prior_config`` (its messages), and every pp rank's stages are built by the
trainer's ``build_prior_parts`` on the meta device and sharded by its ``apply_prior_fsdp``, under a fake process
group of pp·replicate·shard ranks (``plan_build.py``). The shard shapes are read off the DTensors at shard
coordinate 0, whose FSDP2 chunk is the largest; the rest is arithmetic over them (``plan_memory.py``). Options
that model engines not built yet (``plan_build.MODELLED``) are named in the output's notes. Every term and
assumption: docs/scaling.md.

The paper's figures to set next to the output: 12B weights "about 24 GB" in 16 bits, more than a 16 GB V100
[P §2.5]; 1024 V100s = 128 machines × 8, each parameter sharded over the 8 GPUs of a machine [P B.2, Fig. 5];
PowerSGD at rank 896 (112 per GPU) saving ≈86% of the resblock traffic [P Table 1, B.2].
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from .config import ConfigError, PriorRunConfig, to_dict
from .models.prior import DallePrior
from .parallel.pipeline import bubble_fraction
from .parallel.topology import Topology
from .plan_build import (
    ATTENTION_KERNELS,
    FP32,
    GIB,
    GPUS,
    MOMENTS,
    PRECISIONS,
    RESERVE_FIXED_BYTES,
    RESERVE_FRACTION,
    STORAGES,
    BatchPlan,
    DryRunOptions,
    ParamShard,
    StageShards,
    fake_process_group,
    modelled,
    prior_run_config,
    shard_sizes,
    shard_stages,
    usable_bytes,
)
from .plan_format import format_dry_run
from .plan_memory import (
    activation_bytes,
    comm_buffer_bytes,
    in_flight,
    in_flight_per_stage,
    optimizer_kind,
    rank_memory,
    replica_traffic,
    total_powersgd_rank,
)
from .train.prior_checks import check_prior_config

__all__ = [
    "FP32",
    "GIB",
    "GPUS",
    "BatchPlan",
    "DryRunOptions",
    "ParamShard",
    "StageShards",
    "activation_bytes",
    "comm_buffer_bytes",
    "dry_run",
    "fake_process_group",
    "format_dry_run",
    "in_flight",
    "in_flight_per_stage",
    "plan_batches",
    "prior_run_config",
    "rank_memory",
    "replica_traffic",
    "resolved_options",
    "shard_sizes",
    "shard_stages",
    "usable_bytes",
]


def _check_options(opts: DryRunOptions) -> None:
    choices = {"precision": PRECISIONS, "attention": ATTENTION_KERNELS, "storage": STORAGES, "moments": MOMENTS}
    for key, allowed in choices.items():
        if getattr(opts, key) not in allowed:
            raise ConfigError(f"--{key} {getattr(opts, key)!r}: choose one of {list(allowed)}")
    if opts.powersgd_rank < 0:
        raise ConfigError(f"--powersgd-rank {opts.powersgd_rank} must be >= 0 (0: plain all-reduce)")
    if opts.fc2_shard_dim not in (0, 1):
        raise ConfigError(f"--fc2-shard-dim {opts.fc2_shard_dim}: 0 (FSDP2's default) or 1 (the paper's axis)")
    if opts.virtual_stages < 1 or opts.gpus_per_node < 1 or (opts.nodes is not None and opts.nodes < 1):
        raise ConfigError("--virtual-stages, --nodes and --gpus-per-node must be >= 1")
    usable_bytes(opts.gpu)


def resolved_options(opts: DryRunOptions, run_cfg: PriorRunConfig) -> DryRunOptions:
    """``opts`` with every setting the run config fixes taken from it: what the arithmetic reads and the output
    reports. The hardware and the modelled what-ifs stay as given."""
    prec, par = run_cfg.precision, run_cfg.parallel
    return replace(
        opts,
        flavor=run_cfg.model.flavor,
        topology=Topology.parse(par.topology).describe(),
        precision=prec.dtype,
        master_weights=prec.master_weights,
        activation_checkpointing=prec.activation_checkpointing,
        moments=prec.moments_dtype,
        global_batch=run_cfg.data.batch_size,
        microbatches=par.n_microbatches,
        micro_batch=None,
        virtual_stages=par.virtual_stages,
        pp_reshard_per_microbatch=par.pp_reshard == "microbatch",
        fc2_shard_dim=par.fc2_shard_dim,
        powersgd_rank=total_powersgd_rank(run_cfg.comm, run_cfg.model.d_model),
    )


def plan_batches(run_cfg: PriorRunConfig, topo: Topology) -> BatchPlan:
    """Per-rank batch and microbatches of a run config ``check_prior_config`` accepted (pp = 1: one microbatch,
    the engine has no gradient accumulation there)."""
    par = run_cfg.parallel
    per_rank = run_cfg.data.batch_size // topo.dp_size
    n_micro = par.n_microbatches if topo.pp > 1 else 1
    return BatchPlan(run_cfg.data.batch_size, per_rank, n_micro, per_rank // n_micro, par.schedule, par.virtual_stages)


def _notes(topo: Topology, opts: DryRunOptions) -> list[str]:
    notes = []
    flags = modelled(opts)
    if flags:
        notes.append(
            f"modelled, not built: {', '.join(flags)} describe(s) an engine the trainer does not build yet; those "
            "terms are arithmetic over the shards that the trainer's build_prior_parts + apply_prior_fsdp built"
        )
    if topo.shard > opts.gpus_per_node or opts.gpus_per_node % topo.shard:
        notes.append(
            f"shard={topo.shard} does not divide a machine of {opts.gpus_per_node} GPUs: FSDP all-gathers and "
            "reduce-scatters cross the slow inter-machine network, which the paper avoids [P §2.5]"
        )
    if opts.storage == "policy" and topo.shard > 1 and opts.precision != "fp32":
        notes.append(
            "storage=policy: FSDP2 (torch 2.13) refuses a unit whose parameters mix dtypes, and every resblock "
            "Linear holds a 16-bit weight and an fp32 bias; this layout shows what native 16-bit shards would hold"
        )
    if topo.pp > 1 and topo.shard > 1 and not opts.pp_reshard_per_microbatch:
        notes.append(
            "pp > 1: torch.distributed.pipelining keeps each stage all-gathered after its first backward and "
            "accumulates unsharded gradients until the last microbatch (comm_buffers mode stage_unsharded); "
            "--pp-reshard-per-microbatch (parallel.pp_reshard microbatch) reshards every microbatch"
        )
    if opts.fc2_shard_dim == 0 and opts.powersgd_rank > 0 and topo.shard > 1:  # parallel.fc2_shard_dim 0
        notes.append(
            "FSDP2 shards dim 0, which cuts the second MLP matrix (d, 4d) along d; the paper cuts it along 4d "
            "[P Table 2]: compare compression_rate with compression_rate_paper_layout (--fc2-shard-dim 1 builds it)"
        )
    return notes


def _rank_reports(run_cfg: PriorRunConfig, topo: Topology, opts: DryRunOptions, batch: BatchPlan) -> list[dict]:
    """Memory and replica traffic of every pp rank: stage 0 has the embeddings, the last the head."""
    ranks = []
    for pp_rank in range(topo.pp):
        stages = shard_stages(run_cfg, topo, pp_rank, opts)
        report = rank_memory(run_cfg, topo, opts, batch, pp_rank, stages)
        report.update(replica_traffic(stages, topo.shard, run_cfg.comm, run_cfg.model.d_model))
        ranks.append(report)
    return ranks


def _gpu_entry(opts: DryRunOptions, usable: int) -> dict[str, Any]:
    """The output's ``gpu``: the card, its nominal and usable bytes, and the reserve between them."""
    return {
        "name": opts.gpu,
        "nominal_bytes": int(GPUS[opts.gpu] * GIB),
        "usable_bytes": usable,
        "reserve": f"{RESERVE_FIXED_BYTES // GIB} GiB + {RESERVE_FRACTION:.0%}",
    }


def _batch_entry(batch: BatchPlan, topo: Topology) -> dict[str, Any]:
    """The output's ``batch``: global, per-rank and microbatch sizes, and the schedule (``none`` at pp = 1)."""
    return {
        "global": batch.global_batch,
        "per_rank": batch.per_rank,
        "microbatches": batch.microbatches,
        "micro_batch": batch.micro_batch,
        "schedule": batch.schedule if topo.pp > 1 else "none",
        "virtual_stages": batch.virtual_stages,
    }


def _settings_entry(opts: DryRunOptions) -> dict[str, Any]:
    """The output's ``settings``: the resolved options the arithmetic read."""
    return {
        "precision": opts.precision,
        "storage": opts.storage,
        "master_weights": opts.master_weights,
        "moments": opts.moments,
        "optimizer": optimizer_kind(opts),
        "activation_checkpointing": opts.activation_checkpointing,
        "attention": opts.attention,
        "ema_on_device": opts.ema_on_device,
        "pp_reshard_per_microbatch": opts.pp_reshard_per_microbatch,
        "fc2_shard_dim": opts.fc2_shard_dim,
        "powersgd_rank": opts.powersgd_rank,
        "modelled": modelled(opts),
    }


def _params_total(run_cfg: PriorRunConfig) -> int:
    """The prior's parameter count, built on the meta device (the global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return sum(p.numel() for p in DallePrior(run_cfg.model).parameters())


def dry_run(opts: DryRunOptions, run_cfg: PriorRunConfig | None = None) -> dict[str, Any]:
    """Simulate one training step of ``run_cfg`` (default: the run ``opts`` describes); one JSON-ready dict.

    With ``run_cfg``, only the hardware and modelled fields of ``opts`` are read.
    """
    start = time.perf_counter()
    _check_options(opts)
    run_cfg = prior_run_config(opts) if run_cfg is None else run_cfg
    topo = Topology.parse(run_cfg.parallel.topology)
    world = topo.world_size if opts.nodes is None else opts.nodes * opts.gpus_per_node
    topo = check_prior_config(run_cfg, world)  # the trainer's checks, with its messages
    opts = resolved_options(opts, run_cfg)
    batch = plan_batches(run_cfg, topo)
    ranks = _rank_reports(run_cfg, topo, opts, batch)
    worst = max(ranks, key=lambda r: r["memory"]["total"])
    busiest = max(ranks, key=lambda r: r["bytes_per_step"]["uncompressed"])
    usable = usable_bytes(opts.gpu)
    params_total = _params_total(run_cfg)
    paper_worst = max(ranks, key=lambda r: r["paper_formats"]["total"])["paper_formats"]
    return {
        "flavor": opts.flavor,
        "topology": {"pp": topo.pp, "replicate": topo.replicate, "shard": topo.shard, "world_size": topo.world_size},
        "gpu": _gpu_entry(opts, usable),
        "batch": _batch_entry(batch, topo),
        "settings": _settings_entry(opts),
        "per_rank_memory_bytes": dict(worst["memory"], pp_rank=worst["pp_rank"]),
        "fits": worst["memory"]["total"] <= usable,
        "headroom_bytes": usable - worst["memory"]["total"],
        "paper_formats": dict(paper_worst, fits=paper_worst["total"] <= usable),
        "bubble_fraction": bubble_fraction(topo.pp, batch.microbatches, batch.virtual_stages),
        "bytes_per_step": dict(busiest["bytes_per_step"], pp_rank=busiest["pp_rank"]),
        "compression_rate": busiest["compression_rate"],
        "compression_rate_all": busiest["compression_rate_all"],
        "compression_rate_paper_layout": busiest["compression_rate_paper_layout"],
        "params_total": params_total,
        "ranks": ranks,
        "run_config": to_dict(run_cfg),
        "notes": _notes(topo, opts),
        "seconds": round(time.perf_counter() - start, 2),
    }
