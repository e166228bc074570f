"""``dalle-dist plan --dry-run``: per-rank memory, pipeline bubble and replica traffic of a topology, by simulation.

The real stages are built on the meta device (shapes, no memory) under a fake process group of pp·replicate·shard
ranks, cut with ``build_stage_modules``, given the engine's numerics and sharded with FSDP2 as
``DistributedPriorTrainer`` does (``fully_shard`` per resblock — and per Linear for 16-bit all-gathers — then per
stage, on ``mesh["shard"]``). The shard shapes are read off the DTensors of each pp rank at shard coordinate 0,
whose FSDP2 chunk is the largest; the rest is arithmetic over them. Every term and assumption: docs/scaling.md.

The paper's figures to set next to the output: 12B weights "about 24 GB" in 16 bits, more than a 16 GB V100
[P §2.5]; 1024 V100s = 128 machines × 8, each parameter sharded over the 8 GPUs of a machine [P B.2, Fig. 5];
PowerSGD at rank 896 (112 per GPU) saving ≈86% of the resblock traffic [P Table 1, B.2].
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import CommConfig, ConfigError, PrecisionConfig, PriorModelConfig, model_config
from .models.prior import DallePrior
from .parallel.pipeline import bubble_fraction, build_stage_modules
from .parallel.powersgd import compression_plan, powersgd_bytes, resolve_rank
from .parallel.topology import Topology, build_mesh
from .precision.policy import DTYPES, apply_precision, keeps_fp32

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
ATTENTION_KERNELS = ("efficient", "math")
# "engine": every shard stored in fp32, each resblock Linear its own FSDP2 unit gathered in 16 bits with an fp32
# reduce-scatter (FSDP2 refuses a unit of mixed dtypes; dalle_dist/train/dist_precision.py). "policy": the precision
# policy's storage, 16-bit weight matrices and fp32 rest, as the single-process trainer holds them [P §2.4, D.2].
STORAGES = ("engine", "policy")


def usable_bytes(gpu: str) -> int:
    """Nominal memory less 1 GiB and 5%: what tensors may occupy at the peak."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}; choose one of {list(GPUS)}")
    nominal = GPUS[gpu] * GIB
    return int(nominal - RESERVE_FIXED_BYTES - RESERVE_FRACTION * nominal)


@dataclass(frozen=True)
class DryRunOptions:
    """What ``plan --dry-run`` simulates; the defaults are the paper's run [P B.2, §2.4]."""

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
    master_weights: bool = False  # "policy" storage: AdamW32's fp32 master copy ("engine": the fp32 shard is one)
    activation_checkpointing: bool = True  # every resblock [P §2.4]; precision.activation_checkpointing in the engine
    attention: str = "efficient"  # "efficient": SDPA kernel without the T×T scores; "math": scores materialised
    ema_on_device: bool = True  # the engine keeps an fp32 EMA of its shards on the device; the paper on the CPU
    pp_reshard_per_microbatch: bool = False  # model an engine that reshards and reduce-scatters every microbatch
    fc2_shard_dim: int = 0  # FSDP2 shard dim of the second MLP matrix; the paper shards it along 4d (dim 1 here)
    nodes: int | None = None  # with gpus_per_node: the world size the topology must multiply out to
    gpus_per_node: int = 8  # [P E.2 note 4]


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
    """One parameter as a rank holds it after ``fully_shard``; itemsizes in bytes."""

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


# ------------------------------------------------------------------------------------------------------------------
# Building the real stages under a fake process group
# ------------------------------------------------------------------------------------------------------------------


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


def _shard_dim(p: torch.Tensor) -> int | None:
    placements = getattr(p, "placements", None)  # a DTensor after fully_shard
    return None if not placements else getattr(placements[0], "dim", None)


def _low_units(stage: nn.Module, low: set[str]) -> list[str]:
    """Modules of the resblocks that directly own a 16-bit weight (their Linears): the engine's 16-bit units."""
    return [
        name
        for name, m in stage.named_modules()
        if name.startswith("resblocks.")
        and name.count(".") > 1
        and any(f"{name}.{n}" in low for n, _ in m.named_parameters(recurse=False))
    ]


def _fully_shard_like_engine(
    stage: nn.Module, shard_mesh: Any, low_units: list[str], dtype: torch.dtype, fc2_shard_dim: int
) -> None:
    """``DistributedPriorTrainer._apply_fsdp``: FSDP2 per 16-bit Linear (if any), per resblock, per stage [P Fig. 5].

    The Linears' policy gathers in 16 bits and reduce-scatters (and accumulates) in fp32, as ``dist_precision``'s
    ``low_precision_policy``. ``fc2_shard_dim=1`` models the paper's layout of the second MLP matrix, sharded along
    its 4d side [P Table 2] (torch stores it (d, 4d), so FSDP2's default dim 0 cuts the d side).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    fc2 = {id(b.fc2.weight) for b in stage.resblocks.values() if hasattr(b, "fc2")}

    def placement(p: nn.Parameter) -> Shard | None:
        return Shard(fc2_shard_dim) if fc2_shard_dim and id(p) in fc2 else None

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for name in low_units:
        fully_shard(stage.get_submodule(name), mesh=shard_mesh, mp_policy=policy, shard_placement_fn=placement)
    for block in stage.resblocks.values():
        fully_shard(block, mesh=shard_mesh, shard_placement_fn=placement)
    fully_shard(stage, mesh=shard_mesh, shard_placement_fn=placement)


def _records(stage: nn.Module, shards: int, units: list[str], low_units: list[str], wire16: int) -> list[ParamShard]:
    out = []
    for name, p in stage.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        dim = _shard_dim(p)
        shape = tuple(p.shape)
        padded = math.prod(shape)
        if dim is not None:
            padded = shard_sizes(shape[dim], shards)[0] * math.prod(shape) // shape[dim]
        unit = max((u for u in units if name.startswith(u + ".") or u == ""), key=len)
        block = name.split(".")[1] if name.startswith("resblocks.") else name.split(".", 1)[0]
        low = not keeps_fp32(name, p)
        store = p.dtype.itemsize
        gather, reduce = (wire16, FP32) if unit in low_units else (store, store)
        wire = wire16 if low else FP32
        out.append(ParamShard(name, block, unit, shape, tuple(local.shape), padded, store, gather, reduce, wire, low))
    return out


def shard_stages(
    cfg: PriorModelConfig, topo: Topology, pp_rank: int, opts: DryRunOptions, shard_rank: int = 0
) -> list[StageShards]:
    """The stages of ``pp_rank`` as its ``shard_rank`` holds them; shard rank 0 has the largest FSDP2 chunks."""
    rank = (pp_rank * topo.replicate) * topo.shard + shard_rank  # mesh order (pp, replicate, shard), replica 0
    dtype = DTYPES[opts.precision]
    with fake_process_group(rank, topo.world_size):
        mesh = build_mesh(topo)
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = DallePrior(cfg)  # draws its init seed from the CPU RNG: keep the caller's stream intact
        stages, indices = build_stage_modules(model, pp_rank, topo.pp, opts.virtual_stages)
        out = []
        for stage, index in zip(stages, indices):
            low = set(apply_precision(stage, PrecisionConfig(dtype=opts.precision)).low_params)
            low_units: list[str] = []
            if opts.storage == "engine":
                with torch.no_grad():
                    for name, p in stage.named_parameters():
                        if name in low:
                            p.data = p.data.float()  # fp32 storage holding 16-bit values (dist_precision)
                low_units = _low_units(stage, low)
            units = [""] + [f"resblocks.{k}" for k in stage.resblocks] + low_units
            if topo.shard > 1:  # the engine applies FSDP2 only when there is something to shard
                _fully_shard_like_engine(stage, mesh["shard"], low_units, dtype, opts.fc2_shard_dim)
            else:
                units, low_units = [""], []  # no FSDP: plain parameters, gradients at the storage dtype
            params = _records(stage, topo.shard, units, low_units, dtype.itemsize)
            kinds = tuple("mlp" if hasattr(b, "fc1") else "attn" for b in stage.resblocks.values())
            out.append(StageShards(index, stage.is_first, stage.is_last, kinds, tuple(params)))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Batches and the pipeline schedule
# ------------------------------------------------------------------------------------------------------------------


def plan_batches(cfg: PriorModelConfig, topo: Topology, opts: DryRunOptions, world_size: int) -> BatchPlan:
    """Per-rank batch and microbatches, checked by the engine's own ``validate_parallel``."""
    from .config import DataConfig, ParallelConfig, PriorRunConfig
    from .train.distributed import validate_parallel

    topo.check(world_size)
    if opts.global_batch < 1 or opts.global_batch % topo.dp_size:
        raise ConfigError(
            f"--global-batch {opts.global_batch} must divide evenly over replicate × shard = {topo.dp_size} "
            f"data-parallel ranks; e.g. --global-batch {topo.dp_size * max(1, opts.global_batch // topo.dp_size)}"
        )
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
        n_micro = 1
    elif opts.microbatches is not None:
        n_micro = opts.microbatches
        if opts.micro_batch is not None and n_micro * opts.micro_batch != per_rank:
            raise ConfigError(
                f"--microbatches {n_micro} × --micro-batch {opts.micro_batch} != per-rank batch {per_rank}"
            )
    else:
        n_micro = per_rank // (opts.micro_batch or 1)  # default micro-batch 1: most microbatches, smallest bubble
    schedule = "interleaved1f1b" if opts.virtual_stages > 1 else "1f1b"
    run = PriorRunConfig(
        model=cfg,
        data=DataConfig(source="random", batch_size=opts.global_batch),
        parallel=ParallelConfig(
            topology=topo.describe(), n_microbatches=n_micro, schedule=schedule, virtual_stages=opts.virtual_stages
        ),
    )
    validate_parallel(run, world_size)  # batch divisibility, microbatches >= pp, stages <= resblocks
    return BatchPlan(opts.global_batch, per_rank, n_micro, per_rank // n_micro, schedule, opts.virtual_stages)


def in_flight(pp_rank: int, pp: int, n_micro: int, virtual_stages: int) -> int:
    """(microbatch, stage) pairs forwarded but not yet backwarded at this rank's peak: their inputs are held.

    1F1B (torch ``Schedule1F1B``): min(m, pp − rank) warm-up forwards, then one backward per forward; stage 0
    holds pp microbatches. Interleaved (``ScheduleInterleaved1F1B._get_warmup_ops``): (v − 1)·(m per round) +
    2·(pp − 1 − rank) warm-up forwards, capped at m·v, plus the one of the steady state.
    """
    if pp == 1:
        return 1
    if virtual_stages == 1:
        return min(n_micro, pp - pp_rank)
    rounds = max(1, n_micro // pp)
    warmup = (virtual_stages - 1) * (n_micro // rounds) + 2 * (pp - 1 - pp_rank)
    return min(warmup + 1, n_micro * virtual_stages)


def in_flight_per_stage(pp_rank: int, pp: int, n_micro: int, virtual_stages: int) -> list[int]:
    """:func:`in_flight` split over the rank's local stages in the order the interleaved warm-up visits them.

    torch's interleaved schedule runs (m per round) forwards of local stage 0, then as many of local stage 1, and
    so on (depth first), so on the last rank the last stage holds one microbatch while the first holds a round.
    """
    total = in_flight(pp_rank, pp, n_micro, virtual_stages)
    per_round = n_micro // max(1, n_micro // pp) if virtual_stages > 1 else n_micro
    counts = [0] * virtual_stages
    op = 0
    while sum(counts) < total:
        j = (op // per_round) % virtual_stages
        if counts[j] < n_micro:
            counts[j] += 1
        op += 1
    return counts


# ------------------------------------------------------------------------------------------------------------------
# Memory terms (bytes, one rank)
# ------------------------------------------------------------------------------------------------------------------


def branch_saved_bytes(cfg: PriorModelConfig, micro_batch: int, kind: str, itemsize: int, attention: str) -> int:
    """Tensors one resblock branch saves for its backward, for one microbatch (autocast in ``itemsize``).

    Attention: the fp32 LayerNorm output and autocast's 16-bit copy of it, q, k, v, the attention output and its
    (B, T, d) copy for the output projection, the kernel's log-sum-exp; "math" adds the (B, heads, T, T) scores and
    probabilities (the efficient and flash kernels never store them). MLP: LayerNorm output (+ copy), fc1 output
    and GELU output (4d each).
    """
    b, t, d = micro_batch, cfg.seq_len, cfg.d_model
    cast = itemsize if itemsize < FP32 else 0
    if kind == "mlp":
        return b * t * d * (FP32 + cast + 2 * cfg.mlp_ratio * itemsize)
    saved = b * t * d * (FP32 + cast + 5 * itemsize) + b * cfg.n_heads * t * FP32
    if attention == "math":
        saved += 2 * b * cfg.n_heads * t * t * itemsize
    return saved


def activation_bytes(
    cfg: PriorModelConfig, stages: list[StageShards], pairs: list[int], batch: BatchPlan, opts: DryRunOptions, pp: int
) -> dict[str, int]:
    """Activations at the backward peak; the residual stream is fp32 [P Fig. 4].

    - held: per (microbatch, stage) in flight, each resblock's fp32 input (all that checkpointing keeps [P §2.4];
      without it also the branch's saved tensors) plus the stage's final residual (sent downstream, or the head's
      input); a later stage's first input is its receive buffer.
    - pipeline_buffers: torch allocates an activation and a gradient receive buffer per microbatch.
    - head: final LayerNorm output and the fp32 logits [P D.2] ×4 (logits, saved log-softmax, their gradients).
    - working: one resblock's branch in backward (recomputed under checkpointing): its saved tensors and their
      gradients, plus two fp32 residual-stream gradients.
    """
    itemsize = DTYPES[opts.precision].itemsize
    x = batch.micro_batch * cfg.seq_len * cfg.d_model * FP32  # one fp32 residual-stream tensor (B, T, d)
    saved = {k: branch_saved_bytes(cfg, batch.micro_batch, k, itemsize, opts.attention) for k in ("attn", "mlp")}
    held = 0
    for s, n in zip(stages, pairs):  # n: microbatches in flight on this local stage
        per_pair = len(s.kinds) * x + int(s.first) * x
        if not opts.activation_checkpointing:
            per_pair += sum(saved[k] for k in s.kinds)
        held += n * per_pair
    buffers = 0
    if pp > 1:
        buffers = sum(batch.microbatches * (int(not s.first) + int(not s.last)) * x for s in stages)
    logits = batch.micro_batch * ((cfg.text_len - 1) * cfg.text_vocab + cfg.image_len * cfg.image_vocab) * FP32
    head = sum(n * (x + 4 * logits) for s, n in zip(stages, pairs) if s.last)
    kinds = {k for s in stages for k in s.kinds}
    working = 2 * max((saved[k] for k in kinds), default=0) + 2 * x
    total = held + buffers + head + working
    return {"held": held, "pipeline_buffers": buffers, "head": head, "working": working, "total": total}


def _units(params: list[ParamShard], shards: int) -> list[dict[str, int]]:
    """Per FSDP2 unit, in execution order: gathered, autograd-gradient, reduce-scatter-input, accumulated bytes."""
    units: dict[str, list[ParamShard]] = {}
    for p in params:
        units.setdefault(p.unit, []).append(p)
    return [
        {
            "root": int(name == ""),
            "gathered": shards * sum(p.padded_numel * p.gather_itemsize for p in ps),  # one flat all-gather output
            "grad": sum(p.numel * p.gather_itemsize for p in ps),
            "rs_input": shards * sum(p.padded_numel * p.reduce_itemsize for p in ps),
            "accumulated": sum(p.numel * p.reduce_itemsize for p in ps),
        }
        for name, ps in units.items()
    ]


def comm_buffer_bytes(stages: list[StageShards], shards: int, pp: int, reshard_per_microbatch: bool) -> dict[str, Any]:
    """FSDP2's unsharded parameters and gradients at the backward peak.

    - "per_unit" (pp = 1, or an engine that reshards after every microbatch): two neighbouring units all-gathered,
      the current and the prefetched one [P Fig. 5], plus the largest unit's autograd gradient and its
      reduce-scatter input. The stage's root unit (embeddings / head) is not resharded after forward (FSDP2 skips
      that for the root) and reduce-scatters last, so its parameters and gradients stay unsharded throughout.
    - "stage_unsharded" (pp > 1 under torch.distributed.pipelining): ``backward_maybe_with_nosync`` sets
      ``reshard_after_backward(False)`` and ``requires_gradient_sync(False)`` for every microbatch, so after the
      first backward the whole stage stays all-gathered and its gradients accumulate unsharded (in the reduce
      dtype) until ``perform_reduce_grad`` reduce-scatters them after the last microbatch.
    """
    if shards == 1:
        return {"mode": "none", "all_gather": 0, "unsharded_grads": 0, "total": 0}
    mode = "stage_unsharded" if pp > 1 and not reshard_per_microbatch else "per_unit"
    units = [_units(list(s.params), shards) for s in stages]
    if mode == "stage_unsharded":
        ag = sum(u["gathered"] for us in units for u in us)
        gr = sum(u["accumulated"] for us in units for u in us) + max(u["rs_input"] for us in units for u in us)
        return {"mode": mode, "all_gather": ag, "unsharded_grads": gr, "total": ag + gr}
    roots = [u for us in units for u in us if u["root"]]  # every local stage's root stays gathered
    busy_ag = busy_gr = 0  # one local stage computes at a time
    for us in units:
        seq = [u for u in us if not u["root"]]
        pair = max((a["gathered"] + b["gathered"] for a, b in zip(seq, seq[1:])), default=0)
        busy_ag = max(busy_ag, pair or sum(u["gathered"] for u in seq))
        busy_gr = max(busy_gr, max((u["grad"] + u["rs_input"] for u in seq), default=0))
    ag = sum(u["gathered"] for u in roots) + busy_ag
    gr = sum(u["grad"] for u in roots) + max(busy_gr, max((u["rs_input"] for u in roots), default=0))
    return {"mode": mode, "all_gather": ag, "unsharded_grads": gr, "total": ag + gr}


def paper_comm_bytes(stages: list[StageShards], shards: int) -> int:
    """The paper's scheme: each resblock (and the embeddings, the head) gathered when used, in its own format."""
    if shards == 1:
        return 0
    groups: dict[str, int] = {}
    for s in stages:
        for p in s.params:
            groups[f"{s.index}.{p.block}"] = groups.get(f"{s.index}.{p.block}", 0) + p.padded_numel * p.wire_itemsize
    sizes = [shards * v for v in groups.values()]
    pair = max((a + b for a, b in zip(sizes, sizes[1:])), default=sum(sizes))
    return pair + 2 * max(sizes)  # + one group's unsharded gradient and its reduce-scatter input


def _powersgd_plan(params: list[ParamShard], rank: int) -> tuple[dict[str, Any], list[str]]:
    # What DistributedPriorTrainer._build_reducer passes: every local shard by name, at the per-shard rank.
    return compression_plan({p.name: p.local_shape for p in params}, rank)


def reduce_workspace_bytes(params: list[ParamShard], replicate: int, pq_rank: int) -> dict[str, Any]:
    """Transients of the replica reduction, after backward (activations and FSDP buffers are free by then).

    - plain all-reduce (``_reduce_replicas``): fp32 copies of any 16-bit gradients, then one flat fp32 buffer.
    - PowerSGD (``PowerSGDReducer.reduce``): the largest same-shape batch stacked, cast to fp32 and masked; then the
      fp32 result of every gradient (``ReduceResult.grads``) beside one batch's decompressed update, the flat
      uncompressed buffer twice (sum and clipped copy) and P, P̂, Q.
    """
    if replicate == 1:
        return {"mode": "none", "total": 0}
    if pq_rank == 0:
        n16 = sum(p.local_numel for p in params if p.itemsize < FP32)
        return {"mode": "allreduce_fp32", "total": FP32 * (n16 + sum(p.local_numel for p in params) + 1)}
    plans, rest = _powersgd_plan(params, pq_rank)
    by_name = {p.name: p for p in params}
    batches: dict[tuple[int, int, int], tuple[int, int]] = {}  # (m, n, r) → (elements, bytes at the grad dtype)
    for name, pl in plans.items():
        n, nbytes = batches.get((pl.m, pl.n, pl.rank), (0, 0))
        batches[(pl.m, pl.n, pl.rank)] = (n + pl.m * pl.n, nbytes + pl.m * pl.n * by_name[name].itemsize)
    biggest, biggest_bytes = max(batches.values(), default=(0, 0))
    cast = FP32 * biggest if biggest_bytes < FP32 * biggest else 0  # .float() copies only 16-bit gradients
    stack = biggest_bytes + cast + FP32 * biggest  # torch.stack, .float(), torch.where
    n_comp = sum(by_name[n].local_numel for n in plans)
    n_rest = sum(by_name[n].local_numel for n in rest)
    pq = FP32 * sum((2 * pl.m + pl.n) * pl.rank for pl in plans.values())  # P, P̂ (m×r) and Q (n×r)
    decompress = FP32 * (n_comp + biggest + 2 * (n_rest + 1)) + pq
    return {"mode": "powersgd_fp32", "total": max(stack, decompress)}


def optimizer_workspace_bytes(params: list[ParamShard], storage: str, sharded: bool) -> int:
    """Temporaries of the optimizer step.

    torch's AdamW ("engine") runs its foreach path on plain tensors (shard = 1), whose ``_foreach_sqrt`` of the
    second moments is one fp32 copy of all of them; on FSDP2's DTensors it falls back to the per-parameter loop (two
    temporaries of one parameter). ``AdamW32`` ("policy") loops too: gradient in fp32, the fp32 weight, the
    denominator.
    """
    biggest = max((p.local_numel for p in params), default=0)
    if storage == "engine":
        return 2 * FP32 * biggest if sharded else FP32 * sum(p.local_numel for p in params)
    return 3 * FP32 * biggest


def replica_traffic(stages: list[StageShards], shards: int, total_rank: int, d_model: int) -> dict[str, Any]:
    """Bytes one rank puts into the replica reduction per step (the all-reduce payload, as in [P Table 2]).

    ``uncompressed``: every gradient shard in the paper's format (16-bit matrices, fp32 gains/biases/embeddings
    [P D.2]). ``powersgd``: P and Q ((m + n)·r per shard, 16-bit as the paper's 1-6-9) for the compressed matrices
    plus the uncompressed rest. ``engine_*``: what the code sends today (fp32 throughout, plus one flag slot).
    """
    params = [p for s in stages for p in s.params]
    by_name = {p.name: p for p in params}
    rank, plans, rest = 0, {}, [p.name for p in params]
    if total_rank > 0:
        rank = resolve_rank(CommConfig(replica_reduce="powersgd", powersgd_rank=total_rank), d_model, shards)
        plans, rest = _powersgd_plan(params, rank)
    comp_plain = sum(by_name[n].local_numel * by_name[n].wire_itemsize for n in plans)
    comp_pq = sum((pl.m + pl.n) * pl.rank * by_name[n].wire_itemsize for n, pl in plans.items())
    rest_bytes = sum(by_name[n].local_numel * by_name[n].wire_itemsize for n in rest)
    pq_elems = sum((pl.m + pl.n) * pl.rank for pl in plans.values())
    n_rest = sum(by_name[n].local_numel for n in rest)
    uncompressed = comp_plain + rest_bytes
    on = total_rank > 0
    traffic = {
        "uncompressed": uncompressed,
        "powersgd": comp_pq + rest_bytes if on else None,
        "compressible_uncompressed": comp_plain,
        "compressible_powersgd": comp_pq,
        "engine_allreduce_fp32": FP32 * (sum(p.local_numel for p in params) + 1),
        "engine_powersgd_fp32": FP32 * (pq_elems + n_rest + 1) if on else None,
        "powersgd_rank_per_gpu": rank or None,
        "compressed_matrices": len(plans),
    }
    return {
        "bytes_per_step": traffic,
        "compression_rate": 1 - comp_pq / comp_plain if on and comp_plain else None,
        "compression_rate_all": 1 - (comp_pq + rest_bytes) / uncompressed if on and uncompressed else None,
        "compression_rate_paper_layout": _paper_layout_rate(params, total_rank, shards),
    }


def _paper_layout_rate(params: list[ParamShard], total_rank: int, shards: int) -> float | None:
    """Table 2's accounting of the same matrices: each sharded along its larger side [P Table 2, E.1]."""
    shapes = [(p.shape[0], p.shape[1]) for p in params if p.low and len(p.shape) == 2]
    if total_rank <= 0 or not shapes:
        return None
    try:
        return powersgd_bytes(shapes, total_rank, shards, 2)["saved_fraction"]
    except ValueError:  # the rank or a side is not divisible by the shard count
        return None


def rank_memory(
    cfg: PriorModelConfig,
    topo: Topology,
    opts: DryRunOptions,
    batch: BatchPlan,
    pp_rank: int,
    stages: list[StageShards],
) -> dict[str, Any]:
    """Every memory term of one rank (shard coordinate 0 of ``pp_rank``), and the paper-format comparison."""
    params = [p for s in stages for p in s.params]
    local = sum(p.local_numel for p in params)
    param_bytes = sum(p.padded_numel * p.itemsize for p in params)  # FSDP2 keeps the padded shard
    grad_bytes = param_bytes  # the reduce-scatter output, padded, cast back to the storage dtype
    master = opts.master_weights and opts.storage == "policy"
    optimizer = 2 * FP32 * local + FP32 * sum(p.local_numel for p in params if master and p.itemsize < FP32)
    optimizer_paper = sum(p.local_numel * (4 if p.low else 8) for p in params)  # 1-6-9 + 0-6-10 [P B.2]
    ema = FP32 * local if opts.ema_on_device else 0
    pq_rank, error, compressed = 0, 0, set()
    if opts.powersgd_rank > 0 and topo.replicate > 1:
        comm = CommConfig(replica_reduce="powersgd", powersgd_rank=opts.powersgd_rank)
        pq_rank = resolve_rank(comm, cfg.d_model, topo.shard)
        plans, _ = _powersgd_plan(params, pq_rank)
        compressed = set(plans)
        error = FP32 * sum(pl.m * pl.n + pl.n * pl.rank for pl in plans.values())  # fp32 E and the fixed Q
    pairs = in_flight_per_stage(pp_rank, topo.pp, batch.microbatches, batch.virtual_stages)
    acts = activation_bytes(cfg, stages, pairs, batch, opts, topo.pp)
    comm_buf = comm_buffer_bytes(stages, topo.shard, topo.pp, opts.pp_reshard_per_microbatch)
    workspace = reduce_workspace_bytes(params, topo.replicate, pq_rank)
    opt_work = optimizer_workspace_bytes(params, opts.storage, topo.shard > 1)
    # Three peaks. Backward: activations and FSDP buffers; the sharded gradients exist from the first reduce-scatter
    # on, except under "stage_unsharded" (reduce-scattered after the last microbatch; a step starts with grads None).
    # Replica reduction and optimizer step: gradients plus their workspaces.
    persistent = param_bytes + optimizer + ema + error
    phases = {
        "backward": acts["total"] + comm_buf["total"] + (0 if comm_buf["mode"] == "stage_unsharded" else grad_bytes),
        "replica_reduce": grad_bytes + workspace["total"],
        "optimizer_step": grad_bytes + opt_work,
    }
    peak = max(phases, key=phases.__getitem__)
    memory = {
        "params": param_bytes,
        "grads": grad_bytes,
        "optimizer": optimizer,
        "ema": ema,
        "error_buffers": error,
        "activations": acts["total"],
        "comm_buffers": comm_buf["total"],
        "reduce_workspace": workspace["total"],
        "optimizer_workspace": opt_work,
        "total": persistent + phases[peak],
        "peak_phase": peak,
        "optimizer_paper_formats": optimizer_paper,
    }
    # The paper's formats [P B.2, D.2, E.2(2)]: 16-bit matrices, no gradient buffer for the compressed ones (the
    # reduce-scatter result goes into the 1-6-9 error buffer), 16-bit moments and error buffers, EMA on the CPU.
    paper_params = sum(p.padded_numel * p.wire_itemsize for p in params)
    paper_grads = sum(p.padded_numel * p.wire_itemsize for p in params if p.name not in compressed)
    paper_error = 2 * sum(p.local_numel for p in params if p.name in compressed)
    paper_comm = paper_comm_bytes(stages, topo.shard)
    paper = paper_params + paper_grads + optimizer_paper + paper_error + acts["total"] + paper_comm
    return {
        "pp_rank": pp_rank,
        "stages": [s.index for s in stages],
        "resblocks": sum(len(s.kinds) for s in stages),
        "has_embeddings": any(s.first for s in stages),
        "has_head": any(s.last for s in stages),
        "in_flight": pairs,  # microbatches held per local stage
        "params_numel_local": local,
        "params_numel_stage": sum(p.numel for p in params),
        "memory": memory,
        "phases": {k: persistent + v for k, v in phases.items()},
        "activations_detail": acts,
        "comm_buffers_detail": comm_buf,
        "reduce_workspace_mode": workspace["mode"],
        "paper_formats": {
            "params": paper_params,
            "grads": paper_grads,
            "optimizer": optimizer_paper,
            "error_buffers": paper_error,
            "activations": acts["total"],
            "comm_buffers": paper_comm,
            "total": paper,
        },
    }


# ------------------------------------------------------------------------------------------------------------------
# The dry run
# ------------------------------------------------------------------------------------------------------------------


def _check_options(opts: DryRunOptions) -> None:
    choices = {"precision": PRECISIONS, "attention": ATTENTION_KERNELS, "storage": STORAGES}
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


def _notes(topo: Topology, opts: DryRunOptions) -> list[str]:
    notes = []
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
            "--pp-reshard-per-microbatch shows an engine that reshards every microbatch"
        )
    if opts.fc2_shard_dim == 0 and opts.powersgd_rank > 0 and topo.shard > 1:
        notes.append(
            "FSDP2 shards dim 0, which cuts the second MLP matrix (d, 4d) along d; the paper cuts it along 4d "
            "[P Table 2]: compare compression_rate with compression_rate_paper_layout (--fc2-shard-dim 1 models it)"
        )
    return notes


def dry_run(opts: DryRunOptions) -> dict[str, Any]:
    """Simulate one training step of ``opts.flavor`` on ``opts.topology``; one JSON-ready dict."""
    start = time.perf_counter()
    _check_options(opts)
    cfg = model_config("prior", opts.flavor)
    topo = Topology.parse(opts.topology)
    world = topo.world_size if opts.nodes is None else opts.nodes * opts.gpus_per_node
    batch = plan_batches(cfg, topo, opts, world)
    ranks = []
    for pp_rank in range(topo.pp):  # every pp rank: stage 0 has the embeddings, the last the head
        stages = shard_stages(cfg, topo, pp_rank, opts)
        report = rank_memory(cfg, topo, opts, batch, pp_rank, stages)
        report.update(replica_traffic(stages, topo.shard, opts.powersgd_rank, cfg.d_model))
        ranks.append(report)
    worst = max(ranks, key=lambda r: r["memory"]["total"])
    busiest = max(ranks, key=lambda r: r["bytes_per_step"]["uncompressed"])
    usable = usable_bytes(opts.gpu)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        params_total = sum(p.numel() for p in DallePrior(cfg).parameters())
    paper_worst = max(ranks, key=lambda r: r["paper_formats"]["total"])["paper_formats"]
    return {
        "flavor": opts.flavor,
        "topology": {"pp": topo.pp, "replicate": topo.replicate, "shard": topo.shard, "world_size": topo.world_size},
        "gpu": {
            "name": opts.gpu,
            "nominal_bytes": int(GPUS[opts.gpu] * GIB),
            "usable_bytes": usable,
            "reserve": f"{RESERVE_FIXED_BYTES // GIB} GiB + {RESERVE_FRACTION:.0%}",
        },
        "batch": {
            "global": batch.global_batch,
            "per_rank": batch.per_rank,
            "microbatches": batch.microbatches,
            "micro_batch": batch.micro_batch,
            "schedule": batch.schedule if topo.pp > 1 else "none",
            "virtual_stages": batch.virtual_stages,
        },
        "settings": {
            "precision": opts.precision,
            "storage": opts.storage,
            "master_weights": opts.master_weights,
            "activation_checkpointing": opts.activation_checkpointing,
            "attention": opts.attention,
            "ema_on_device": opts.ema_on_device,
            "pp_reshard_per_microbatch": opts.pp_reshard_per_microbatch,
            "fc2_shard_dim": opts.fc2_shard_dim,
            "powersgd_rank": opts.powersgd_rank,
        },
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
        "notes": _notes(topo, opts),
        "seconds": round(time.perf_counter() - start, 2),
    }


# ------------------------------------------------------------------------------------------------------------------
# Human-readable output
# ------------------------------------------------------------------------------------------------------------------

TABLE_KEYS = (
    "params",
    "grads",
    "optimizer",
    "ema",
    "error_buffers",
    "activations",
    "comm_buffers",
    "reduce_workspace",
    "optimizer_workspace",
    "total",
)


def _gib(n: float | None, unit: int = GIB) -> str:
    return "-" if n is None else f"{n / unit:.2f}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_dry_run(r: dict[str, Any]) -> str:
    """One table row per pp rank (GiB), then the verdict, the bubble and the replica traffic."""
    t, b, g, s = r["topology"], r["batch"], r["gpu"], r["settings"]
    checkpointing = "on" if s["activation_checkpointing"] else "off"
    short = {
        "error_buffers": "error_buf",
        "activations": "activation",
        "comm_buffers": "fsdp_buf",
        "reduce_workspace": "reduce_ws",
        "optimizer_workspace": "optim_ws",
    }
    header = "".join(f"{short.get(k, k):>12}" for k in TABLE_KEYS) + f"{'paper fmt':>12}"
    unit, unit_name = (GIB, "GiB") if r["per_rank_memory_bytes"]["total"] >= GIB else (2**20, "MiB")  # tiny models
    lines = [
        f"prior {r['flavor']} on pp={t['pp']} × replicate={t['replicate']} × shard={t['shard']} = {t['world_size']} "
        f"ranks, {g['name']} (usable {_gib(g['usable_bytes'])} GiB = nominal − {g['reserve']})",
        f"  batch {b['global']}: {b['per_rank']} per rank = {b['microbatches']} microbatch(es) × {b['micro_batch']} "
        f"(schedule {b['schedule']}, virtual stages {b['virtual_stages']}); {s['precision']} ({s['storage']} "
        f"storage), attention {s['attention']}, activation checkpointing {checkpointing}",
        "",
        f"  {unit_name + ' per rank':<14}{header}",
    ]
    for rank in r["ranks"]:
        cells = [_gib(rank["memory"][k], unit) for k in TABLE_KEYS] + [_gib(rank["paper_formats"]["total"], unit)]
        lines.append(f"  {'pp rank ' + str(rank['pp_rank']):<14}" + "".join(f"{c:>12}" for c in cells))
    m = r["per_rank_memory_bytes"]
    lines += [
        "",
        f"  worst rank: pp rank {m['pp_rank']}, {_gib(m['total'], unit)} {unit_name} at the {m['peak_phase']} peak → "
        f"{'FITS' if r['fits'] else 'DOES NOT FIT'} (headroom {_gib(r['headroom_bytes'])} GiB); in the paper's "
        f"formats {_gib(r['paper_formats']['total'], unit)} {unit_name} → "
        f"{'fits' if r['paper_formats']['fits'] else 'does not fit'}",
        f"  optimizer: {_gib(m['optimizer'], unit)} {unit_name} with fp32 moments, "
        f"{_gib(m['optimizer_paper_formats'], unit)} {unit_name} in the paper's 16-bit moment formats",
        f"  pipeline bubble: {r['bubble_fraction']:.4f}",
    ]
    bps = r["bytes_per_step"]
    traffic = f"  replica reduction per rank and step: uncompressed {bps['uncompressed'] / 1e6:.1f} MB"
    if bps["powersgd"] is not None:
        traffic += (
            f", PowerSGD (rank {bps['powersgd_rank_per_gpu']} per GPU) {bps['powersgd'] / 1e6:.1f} MB; compression "
            f"rate {_rate(r['compression_rate'])} on the compressed matrices ({_rate(r['compression_rate_all'])} "
            f"overall, {_rate(r['compression_rate_paper_layout'])} in the paper's shard layout)"
        )
    lines.append(traffic)
    lines += [f"  note: {n}" for n in r["notes"]]
    lines.append(f"  ({r['seconds']:.1f} s)")
    return "\n".join(lines)
