"""``plan --dry-run``'s arithmetic: one rank's memory terms and replica traffic over the shards the engine built.

Inputs are the :class:`~dalle_dist.plan_build.StageShards` that ``plan_build.shard_stages`` measured, the run
config the trainer would be given, and the resolved options. Every term and assumption: docs/scaling.md.
"""

from __future__ import annotations

from typing import Any

from .config import CommConfig, PriorModelConfig, PriorRunConfig
from .parallel.powersgd import compression_plan, powersgd_bytes, resolve_rank
from .parallel.topology import Topology
from .plan_build import FP32, BatchPlan, DryRunOptions, ParamShard, StageShards
from .precision.policy import DTYPES


def in_flight(pp_rank: int, pp: int, n_micro: int, virtual_stages: int, schedule: str = "1f1b") -> int:
    """(microbatch, stage) pairs forwarded but not yet backwarded at this rank's peak: their inputs are held.

    GPipe (``ScheduleGPipe``): every forward before the first backward, m. 1F1B (torch ``Schedule1F1B``):
    min(m, pp − rank) warm-up forwards, then one backward per forward; stage 0 holds pp microbatches.
    Interleaved (``ScheduleInterleaved1F1B._get_warmup_ops``): (v − 1)·(m per round) +
    2·(pp − 1 − rank) warm-up forwards, capped at m·v, plus the one of the steady state.
    """
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return n_micro
    if virtual_stages == 1:
        return min(n_micro, pp - pp_rank)
    rounds = max(1, n_micro // pp)
    warmup = (virtual_stages - 1) * (n_micro // rounds) + 2 * (pp - 1 - pp_rank)
    return min(warmup + 1, n_micro * virtual_stages)


def in_flight_per_stage(pp_rank: int, pp: int, n_micro: int, virtual_stages: int, schedule: str = "1f1b") -> list[int]:
    """:func:`in_flight` split over the rank's local stages in the order the interleaved warm-up visits them.

    torch's interleaved schedule runs (m per round) forwards of local stage 0, then as many of local stage 1, and
    so on (depth first), so on the last rank the last stage holds one microbatch while the first holds a round.
    """
    total = in_flight(pp_rank, pp, n_micro, virtual_stages, schedule)
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
      reduce-scatter input. The embeddings and the head are units of their own (``parallel/fsdp.py``); a root unit
      that holds parameters would not be resharded after forward (FSDP2 skips that for the root) and reduce-scatters
      last, so its parameters and gradients would stay unsharded throughout.
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


def powersgd_rank(comm: CommConfig, d_model: int, shards: int) -> int:
    """The reducer's rank per shard matrix (``resolve_rank``), 0 without PowerSGD."""
    return resolve_rank(comm, d_model, shards) if comm.replica_reduce == "powersgd" else 0


def total_powersgd_rank(comm: CommConfig, d_model: int) -> int:
    """The rank over the shards of a matrix (12B: 896 [P Table 1]), 0 without PowerSGD."""
    return powersgd_rank(comm, d_model, 1)


def _powersgd_plan(params: list[ParamShard], rank: int, comm: CommConfig) -> tuple[dict[str, Any], list[str]]:
    # What PriorTrainer._build_reducer passes: every local shard by name, at the per-shard rank, and its threshold.
    return compression_plan({p.name: p.local_shape for p in params}, rank, comm.powersgd_min_compression_rate)


def reduce_workspace_bytes(params: list[ParamShard], replicate: int, pq_rank: int, comm: CommConfig) -> dict[str, Any]:
    """Transients of the replica reduction, after backward (activations and FSDP buffers are free by then).

    - plain all-reduce (``PriorTrainer._reduce``): fp32 copies of any 16-bit gradients, then one flat fp32 buffer.
    - PowerSGD (``PowerSGDReducer.reduce``): the largest same-shape batch stacked, cast to fp32 and masked; then the
      fp32 result of every gradient (``ReduceResult.grads``) beside one batch's decompressed update, the flat
      uncompressed buffer twice (sum and clipped copy) and P, P̂, Q.
    """
    if replicate == 1:
        return {"mode": "none", "total": 0}
    if pq_rank == 0:
        n16 = sum(p.local_numel for p in params if p.itemsize < FP32)
        return {"mode": "allreduce_fp32", "total": FP32 * (n16 + sum(p.local_numel for p in params) + 1)}
    plans, rest = _powersgd_plan(params, pq_rank, comm)
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


def optimizer_kind(opts: DryRunOptions) -> str:
    """The optimizer ``PriorTrainer._build_optimizer`` picks: torch's ``AdamW`` when nothing is rounded to 16 bits
    (fp32, or fp32 master weights with fp32 moments), ``ShardedAdamW32`` otherwise; ``AdamW32`` under the modelled
    ``--storage policy`` (16-bit storage)."""
    if opts.storage == "policy":
        return "AdamW32"
    if opts.precision == "fp32" or (opts.master_weights and opts.moments == "fp32"):
        return "AdamW"
    return "ShardedAdamW32"


def _moments16(opts: DryRunOptions) -> bool:
    """bf16 moments for the 16-bit weights (``precision.moments_dtype``), which torch's AdamW never keeps."""
    return opts.moments == "bf16" and opts.precision != "fp32" and optimizer_kind(opts) != "AdamW"


def optimizer_bytes(params: list[ParamShard], opts: DryRunOptions) -> int:
    """``exp_avg`` + ``exp_avg_sq`` of every local element: fp32 (8 B), or bf16 (4 B) for the 16-bit weights with
    ``moments=bf16``; plus ``AdamW32``'s fp32 master copy of 16-bit-stored weights (``--storage policy``)."""
    low16 = opts.precision != "fp32"
    moments16, master = _moments16(opts), opts.master_weights and opts.storage == "policy"
    moments = sum(p.local_numel * 2 * (2 if moments16 and p.low and low16 else FP32) for p in params)
    return moments + sum(FP32 * p.local_numel for p in params if master and p.itemsize < FP32)


def optimizer_workspace_bytes(params: list[ParamShard], opts: DryRunOptions, sharded: bool) -> int:
    """Temporaries of the optimizer step.

    torch's AdamW runs its foreach path on plain tensors (shard = 1), whose ``_foreach_sqrt`` of the second
    moments is one fp32 copy of all of them; on FSDP2's DTensors it falls back to the per-parameter loop (two
    temporaries of one parameter). ``ShardedAdamW32`` loops over fp32 storage and gradients: the square root and
    the denominator, plus fp32 copies of bf16 moments. ``AdamW32`` on 16-bit storage: gradient in fp32, the fp32
    weight, the denominator.
    """
    biggest = max((p.local_numel for p in params), default=0)
    kind = optimizer_kind(opts)
    if kind == "AdamW":
        return 2 * FP32 * biggest if sharded else FP32 * sum(p.local_numel for p in params)
    if kind == "ShardedAdamW32":
        return (4 if _moments16(opts) else 2) * FP32 * biggest
    return 3 * FP32 * biggest


def replica_traffic(stages: list[StageShards], shards: int, comm: CommConfig, d_model: int) -> dict[str, Any]:
    """Bytes one rank puts into the replica reduction per step (the all-reduce payload, as in [P Table 2]).

    ``uncompressed``: every gradient shard in the paper's format (16-bit matrices, fp32 gains/biases/embeddings
    [P D.2]). ``powersgd``: P and Q ((m + n)·r per shard, 16-bit as the paper's 1-6-9) for the compressed matrices
    plus the uncompressed rest. ``engine_*``: what the code sends today (fp32 throughout, plus one flag slot).
    """
    params = [p for s in stages for p in s.params]
    by_name = {p.name: p for p in params}
    rank, plans, rest = powersgd_rank(comm, d_model, shards), {}, [p.name for p in params]
    if rank > 0:
        plans, rest = _powersgd_plan(params, rank, comm)
    comp_plain = sum(by_name[n].local_numel * by_name[n].wire_itemsize for n in plans)
    comp_pq = sum((pl.m + pl.n) * pl.rank * by_name[n].wire_itemsize for n, pl in plans.items())
    rest_bytes = sum(by_name[n].local_numel * by_name[n].wire_itemsize for n in rest)
    pq_elems = sum((pl.m + pl.n) * pl.rank for pl in plans.values())
    n_rest = sum(by_name[n].local_numel for n in rest)
    uncompressed = comp_plain + rest_bytes
    on = rank > 0
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
        "compression_rate_paper_layout": _paper_layout_rate(params, total_powersgd_rank(comm, d_model), shards),
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


def _powersgd_error(
    params: list[ParamShard], topo: Topology, comm: CommConfig, d_model: int
) -> tuple[int, int, set[str]]:
    """PowerSGD's per-shard rank, error-buffer bytes and compressed parameter names (0, 0, {} without it)."""
    if topo.replicate <= 1 or comm.replica_reduce != "powersgd":
        return 0, 0, set()
    pq_rank = powersgd_rank(comm, d_model, topo.shard)
    plans, _ = _powersgd_plan(params, pq_rank, comm)
    error = FP32 * sum(pl.m * pl.n + pl.n * pl.rank for pl in plans.values())  # fp32 E and the fixed Q
    return pq_rank, error, set(plans)


def _phases(acts: dict[str, Any], comm_buf: dict[str, Any], grad_bytes: int, workspace: int, opt_work: int) -> dict:
    """The transient bytes of each of the step's three peaks, on top of the persistent ones."""
    # Three peaks. Backward: activations and FSDP buffers; the sharded gradients exist from the first reduce-scatter
    # on, except under "stage_unsharded" (reduce-scattered after the last microbatch; a step starts with grads None).
    # Replica reduction and optimizer step: gradients plus their workspaces.
    return {
        "backward": acts["total"] + comm_buf["total"] + (0 if comm_buf["mode"] == "stage_unsharded" else grad_bytes),
        "replica_reduce": grad_bytes + workspace,
        "optimizer_step": grad_bytes + opt_work,
    }


def _paper_formats(
    params: list[ParamShard],
    stages: list[StageShards],
    shards: int,
    compressed: set[str],
    optimizer_paper: int,
    activations: int,
) -> dict[str, int]:
    """The rank's memory in the paper's formats, term by term and in total."""
    # The paper's formats [P B.2, D.2, E.2(2)]: 16-bit matrices, no gradient buffer for the compressed ones (the
    # reduce-scatter result goes into the 1-6-9 error buffer), 16-bit moments and error buffers, EMA on the CPU.
    paper_params = sum(p.padded_numel * p.wire_itemsize for p in params)
    paper_grads = sum(p.padded_numel * p.wire_itemsize for p in params if p.name not in compressed)
    paper_error = 2 * sum(p.local_numel for p in params if p.name in compressed)
    paper_comm = paper_comm_bytes(stages, shards)
    paper = paper_params + paper_grads + optimizer_paper + paper_error + activations + paper_comm
    return {
        "params": paper_params,
        "grads": paper_grads,
        "optimizer": optimizer_paper,
        "error_buffers": paper_error,
        "activations": activations,
        "comm_buffers": paper_comm,
        "total": paper,
    }


def rank_memory(
    run_cfg: PriorRunConfig,
    topo: Topology,
    opts: DryRunOptions,
    batch: BatchPlan,
    pp_rank: int,
    stages: list[StageShards],
) -> dict[str, Any]:
    """Every memory term of one rank (shard coordinate 0 of ``pp_rank``), and the paper-format comparison.

    ``opts`` carries the run config's settings (``plan_dry_run.resolved_options``) and the modelled what-ifs.
    """
    cfg, comm = run_cfg.model, run_cfg.comm
    params = [p for s in stages for p in s.params]
    local = sum(p.local_numel for p in params)
    param_bytes = sum(p.padded_numel * p.itemsize for p in params)  # FSDP2 keeps the padded shard
    grad_bytes = param_bytes  # the reduce-scatter output, padded, cast back to the storage dtype
    optimizer = optimizer_bytes(params, opts)
    optimizer_paper = sum(p.local_numel * (4 if p.low else 8) for p in params)  # 1-6-9 + 0-6-10 [P B.2]
    ema = FP32 * local if opts.ema_on_device else 0
    pq_rank, error, compressed = _powersgd_error(params, topo, comm, cfg.d_model)
    pairs = in_flight_per_stage(pp_rank, topo.pp, batch.microbatches, batch.virtual_stages, batch.schedule)
    acts = activation_bytes(cfg, stages, pairs, batch, opts, topo.pp)
    comm_buf = comm_buffer_bytes(stages, topo.shard, topo.pp, opts.pp_reshard_per_microbatch)
    workspace = reduce_workspace_bytes(params, topo.replicate, pq_rank, comm)
    opt_work = optimizer_workspace_bytes(params, opts, topo.shard > 1)
    persistent = param_bytes + optimizer + ema + error
    phases = _phases(acts, comm_buf, grad_bytes, workspace["total"], opt_work)
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
        "paper_formats": _paper_formats(params, stages, topo.shard, compressed, optimizer_paper, acts["total"]),
    }
