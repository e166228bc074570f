"""What ``plan --dry-run`` measures: the trainer's run config, and the shards its engine builds for one rank.

The stages come from the trainer's own functions: :func:`~dalle_dist.parallel.parallelize.build_prior_parts` on
the meta device (meta build, pipeline cut, ``apply_stage_precision``) and
:func:`~dalle_dist.parallel.parallelize.apply_prior_fsdp` (FSDP2 per 16-bit Linear, per resblock, per stage),
under a fake process group of pp·replicate·shard ranks. The shard shapes and each FSDP2 unit's all-gather and
reduce-scatter dtypes are read off what those functions built. A few options describe engines that do not exist
yet (``MODELLED``); they rewrite the measured records arithmetically and the output says so.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, PriorRunConfig, build_config
from .parallel.parallelize import apply_prior_fsdp, build_prior_parts
from .parallel.topology import Topology, build_mesh
from .precision.policy import DTYPES, keeps_fp32

GIB = 2**30
FP32 = 4
# Nominal device memory in GiB. NVIDIA's "16 GB" V100 has 16 GiB of HBM2; the H200's "141 GB" is taken as 141 GiB
# (the device reports about 140.4 GiB; the reserve below covers the difference).
GPUS: dict[str, float] = {
    "v100-16gb": 16,
    "v100-32gb": 32,
    "a100-40gb": 40,
    "a100-80gb": 80,
    "h100-80gb": 80,
    "h200-141gb": 141,
}
# Not available to tensors: the CUDA context, cuBLAS/NCCL workspaces (a fixed part) and caching-allocator
# fragmentation (a proportional part).
RESERVE_FIXED_BYTES = GIB
RESERVE_FRACTION = 0.05
PRECISIONS = ("fp16", "bf16", "fp32")
MOMENTS = ("fp32", "bf16")
ATTENTION_KERNELS = ("efficient", "math")
# "engine": what the trainer builds (apply_stage_precision + apply_prior_fsdp): every shard stored in fp32, each
# resblock Linear its own FSDP2 unit gathered in 16 bits with an fp32 reduce-scatter. "policy" (modelled): 16-bit
# weight matrices and fp32 rest, as native 16-bit shards would hold them [P §2.4, D.2].
STORAGES = ("engine", "policy")
# DryRunOptions fields that model engines not built yet: value that the trainer builds → CLI flag.
MODELLED = {
    "storage": ("engine", "--storage policy"),
    "ema_on_device": (True, "--ema-on-cpu"),
}
# DryRunOptions fields that are run-config keys; PowerSGD, the schedule and the microbatches are mapped apart.
CONFIG_KEYS = {
    "flavor": "model.flavor",
    "topology": "parallel.topology",
    "precision": "precision.dtype",
    "master_weights": "precision.master_weights",
    "activation_checkpointing": "precision.activation_checkpointing",
    "moments": "precision.moments_dtype",
    "global_batch": "data.batch_size",
    "microbatches": "parallel.n_microbatches",
    "virtual_stages": "parallel.virtual_stages",
    "fc2_shard_dim": "parallel.fc2_shard_dim",
}


def usable_bytes(gpu: str) -> int:
    """Nominal memory less 1 GiB and 5%: what tensors may occupy at the peak."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}; choose one of {list(GPUS)}")
    nominal = GPUS[gpu] * GIB
    return int(nominal - RESERVE_FIXED_BYTES - RESERVE_FRACTION * nominal)


@dataclass(frozen=True)
class DryRunOptions:
    """What ``plan --dry-run`` simulates; the defaults are the paper's run [P B.2, §2.4].

    ``flavor`` … ``moments`` (and ``powersgd_rank``) describe the run config when no YAML is given
    (:func:`prior_run_config`); with a run config they are read from it. ``gpu``, ``attention``, ``nodes`` and
    ``gpus_per_node`` describe the hardware; the ``MODELLED`` fields engines not built yet.
    """

    flavor: str = "12B"
    topology: str = "pp=1,replicate=128,shard=8"
    gpu: str = "v100-16gb"
    precision: str = "fp16"  # the weight matrices' 16-bit format [P §2.4]; gains, biases, embeddings fp32 [P D.2]
    storage: str = "engine"  # see STORAGES
    powersgd_rank: int = 0  # total rank over the shards of a matrix (12B: 896 [P Table 1]); 0: plain all-reduce
    global_batch: int = 1024  # [P B.2]
    microbatches: int | None = None  # None: the per-rank batch when pp > 1 (micro-batch 1), 1 when pp = 1
    micro_batch: int | None = None
    virtual_stages: int = 1  # > 1: interleaved 1F1B
    master_weights: bool = False  # precision.master_weights ("policy" storage: AdamW32's fp32 master copy)
    activation_checkpointing: bool = True  # every resblock [P §2.4]; precision.activation_checkpointing
    moments: str = "bf16"  # precision.moments_dtype of the 16-bit weights' Adam moments (4 B [P B.2]; "fp32": 8 B)
    attention: str = "efficient"  # "efficient": SDPA kernel without the T×T scores; "math": scores materialised
    ema_on_device: bool = True  # the engine keeps an fp32 EMA of its shards on the device; the paper on the CPU
    pp_reshard_per_microbatch: bool = False  # parallel.pp_reshard=microbatch: reshard + reduce-scatter per microbatch
    fc2_shard_dim: int = 1  # parallel.fc2_shard_dim: the second MLP matrix (d, 4d) cut along 4d [P Table 2]; 0: d
    nodes: int | None = None  # with gpus_per_node: the world size the topology must multiply out to
    gpus_per_node: int = 8  # [P E.2 note 4]


def modelled(opts: DryRunOptions) -> list[str]:
    """The flags of ``opts`` that model an engine the trainer does not build."""
    return [flag for key, (built, flag) in MODELLED.items() if getattr(opts, key) != built]


def config_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted run-config overrides for DryRunOptions fields (``CONFIG_KEYS``, ``powersgd_rank``)."""
    out = {CONFIG_KEYS[k]: v for k, v in values.items() if k in CONFIG_KEYS}
    if "virtual_stages" in values:
        out["parallel.schedule"] = "interleaved1f1b" if values["virtual_stages"] > 1 else "1f1b"
    if "pp_reshard_per_microbatch" in values:
        out["parallel.pp_reshard"] = "microbatch" if values["pp_reshard_per_microbatch"] else "step"
    if "powersgd_rank" in values:
        rank = values["powersgd_rank"]
        out["comm.replica_reduce"] = "powersgd" if rank > 0 else "allreduce"
        out["comm.powersgd_rank"] = max(0, rank)
    return out


def _microbatches(opts: DryRunOptions, topo: Topology) -> int:
    """The planner's default: micro-batch 1 (most microbatches, smallest bubble) when pp > 1; refuses
    ``--microbatches`` / ``--micro-batch`` / ``--virtual-stages`` that cannot describe the run."""
    per_rank = opts.global_batch // topo.dp_size
    if opts.micro_batch is not None and (opts.micro_batch < 1 or per_rank % opts.micro_batch):
        raise ConfigError(f"--micro-batch {opts.micro_batch} must divide the per-rank batch {per_rank}")
    if topo.pp == 1:
        # One forward/backward over the per-rank batch: the engine has no gradient accumulation at pp = 1.
        if (opts.microbatches or 1) > 1 or (opts.micro_batch or per_rank) != per_rank or opts.virtual_stages > 1:
            raise ConfigError(
                f"with pp=1 the engine runs the whole per-rank batch ({per_rank}) at once: --microbatches, "
                f"--micro-batch and --virtual-stages apply to pp > 1"
            )
        return 1
    if opts.microbatches is not None:
        if opts.micro_batch is not None and opts.microbatches * opts.micro_batch != per_rank:
            raise ConfigError(
                f"--microbatches {opts.microbatches} × --micro-batch {opts.micro_batch} != per-rank batch {per_rank}"
            )
        return opts.microbatches
    return max(1, per_rank // (opts.micro_batch or 1))


def prior_run_config(
    opts: DryRunOptions, files: Sequence[str] = (), overrides: Mapping[str, Any] | None = None
) -> PriorRunConfig:
    """The run config the trainer would be given: ``build_config("prior", files, overrides)``, the launcher's path.

    Without ``files`` the options describe it (their fields as overrides, the planner's default microbatches),
    and ``overrides`` go on top; with ``files`` only ``overrides`` are added (the CLI passes the flags it was given).
    """
    layer: dict[str, Any] = {}
    if not files:
        values = {k: getattr(opts, k) for k in (*CONFIG_KEYS, "powersgd_rank", "pp_reshard_per_microbatch")}
        values["microbatches"] = _microbatches(opts, Topology.parse(opts.topology))
        layer = config_overrides(values)
    return build_config("prior", list(files), {**layer, **(overrides or {})})


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    per_rank: int  # samples per data-parallel rank and step
    microbatches: int
    micro_batch: int
    schedule: str
    virtual_stages: int


@dataclass(frozen=True)
class ParamShard:
    """One parameter as a rank holds it after ``apply_prior_fsdp``; itemsizes in bytes."""

    name: str  # single-process name: embed.*, resblocks.K.*, head.*
    block: str  # resblock key, or "embed" / "head"
    unit: str  # the FSDP2 unit that gathers it: "" (the stage), "resblocks.K", "resblocks.K.mlp.fc1", ...
    shape: tuple[int, ...]  # the whole parameter
    local_shape: tuple[int, ...]  # this rank's shard (unpadded, as ``to_local()`` returns it)
    padded_numel: int  # FSDP2's per-rank storage: the shard dim padded to ceil(size / shard)
    itemsize: int  # storage (and sharded gradient) dtype
    gather_itemsize: int  # all-gathered parameter and its autograd gradient (FSDP2's param_dtype)
    reduce_itemsize: int  # reduce-scatter input and microbatch accumulation (FSDP2's reduce_dtype)
    wire_itemsize: int  # the paper's format: 16 bits for the weight matrices, fp32 for the rest [P D.2]
    low: bool  # a resblock weight matrix (16-bit class); False: gains, biases, embeddings, unembeddings

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)


@dataclass(frozen=True)
class StageShards:
    index: int  # global stage index
    first: bool
    last: bool
    kinds: tuple[str, ...]  # "attn" | "mlp" per resblock, in order
    params: tuple[ParamShard, ...]


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """A default process group of ``world_size`` ranks whose collectives do nothing; destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("plan --dry-run starts its own fake process group, but one is already initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_sizes(size: int, shards: int) -> list[int]:
    """Rows each shard rank holds along FSDP2's shard dim: torch.chunk sizes, ceil(size / shards) first."""
    chunk = -(-size // shards)
    return [max(0, min(chunk, size - s * chunk)) for s in range(shards)]


def _fsdp_units(stage: nn.Module) -> dict[str, tuple[torch.dtype | None, torch.dtype | None]]:
    """Every FSDP2 unit of a stage by module name, with its MixedPrecisionPolicy's (param, reduce) dtypes."""
    from torch.distributed.fsdp import FSDPModule

    units: dict[str, tuple[torch.dtype | None, torch.dtype | None]] = {"": (None, None)}  # no FSDP: one unit
    for name, module in stage.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group  # torch 2.13 FSDP2: the unit's parameters
            policy = getattr(group, "mp_policy", None)
            units[name] = (None, None) if policy is None else (policy.param_dtype, policy.reduce_dtype)
    return units


def _records(stage: nn.Module, shards: int, wire16: int) -> list[ParamShard]:
    """The parameters of a built (and FSDP-wrapped) stage as this rank holds them."""
    units = _fsdp_units(stage)
    out = []
    for name, p in stage.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        placements = getattr(p, "placements", None)  # a DTensor after fully_shard
        dim = getattr(placements[0], "dim", None) if placements else None
        shape = tuple(p.shape)
        padded = math.prod(shape)
        if dim is not None:
            padded = shard_sizes(shape[dim], shards)[0] * math.prod(shape) // shape[dim]
        unit = max((u for u in units if u == "" or name.startswith(u + ".")), key=len)
        param_dtype, reduce_dtype = units[unit]
        store = p.dtype.itemsize
        gather = param_dtype.itemsize if param_dtype is not None else store
        reduce = reduce_dtype.itemsize if reduce_dtype is not None else gather
        low = not keeps_fp32(name, p)
        block = name.split(".")[1] if name.startswith("resblocks.") else name.split(".", 1)[0]
        wire = wire16 if low else FP32
        out.append(ParamShard(name, block, unit, shape, tuple(local.shape), padded, store, gather, reduce, wire, low))
    return out


def _modelled_record(p: ParamShard, opts: DryRunOptions, low16: bool, shards: int, shard_rank: int) -> ParamShard:
    """The what-if engine ``--storage policy`` over a measured record: native 16-bit shards, one FSDP2 unit per
    resblock, no mixed-precision policy."""
    from dataclasses import replace

    if opts.storage == "policy":
        size = p.wire_itemsize if low16 else p.itemsize
        # One unit per resblock, and the embeddings and head as units of their own, as the engine builds them.
        unit = "" if shards == 1 else f"resblocks.{p.block}" if p.name.startswith("resblocks.") else p.block
        p = replace(p, unit=unit, itemsize=size, gather_itemsize=size, reduce_itemsize=size)
    return p


def shard_stages(
    run_cfg: PriorRunConfig, topo: Topology, pp_rank: int, opts: DryRunOptions, shard_rank: int = 0
) -> list[StageShards]:
    """The stages of ``pp_rank`` as its ``shard_rank`` holds them; shard rank 0 has the largest FSDP2 chunks.

    Built by the trainer's ``build_prior_parts`` (meta device) and ``apply_prior_fsdp`` on ``mesh["shard"]``.
    """
    rank = (pp_rank * topo.replicate) * topo.shard + shard_rank  # mesh order (pp, replicate, shard), replica 0
    wire16 = DTYPES[run_cfg.precision.dtype].itemsize
    with fake_process_group(rank, topo.world_size):
        mesh = build_mesh(topo)
        with torch.random.fork_rng(devices=[]):  # build_prior_parts seeds the CPU RNG: keep the caller's stream
            parts = build_prior_parts(run_cfg, topo, pp_rank, torch.device("meta"))
        apply_prior_fsdp(parts, topo, mesh["shard"])
        low = set(parts.policy.low_params)
        out = []
        for stage, index in zip(parts.stages, parts.pipeline.stage_ids):
            params = [
                _modelled_record(p, opts, p.name in low, topo.shard, shard_rank)
                for p in _records(stage, topo.shard, wire16)
            ]
            kinds = tuple("mlp" if hasattr(b, "fc1") else "attn" for b in stage.resblocks.values())
            out.append(StageShards(index, stage.is_first, stage.is_last, kinds, tuple(params)))
    return out
