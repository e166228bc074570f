"""Every check of a prior run that needs no process group, with the fix in the message [style rule 10]."""

from __future__ import annotations

from ..config import ConfigError, PriorRunConfig
from ..data.pipeline import check_shard_config
from ..parallel.pipeline import PP_RESHARD, SCHEDULES
from ..parallel.topology import Topology


def check_prior_config(cfg: PriorRunConfig, world_size: int | None = None) -> Topology:
    """Validate the config against its topology (and the process count, when given); returns the topology."""
    cfg.validate()
    par = cfg.parallel
    topo = Topology.parse(par.topology)
    if world_size is not None:
        topo.check(world_size)
    if par.schedule not in SCHEDULES:
        raise ConfigError(f"parallel.schedule={par.schedule!r}: choose one of {list(SCHEDULES)}")
    if par.pp_reshard not in PP_RESHARD:
        raise ConfigError(f"parallel.pp_reshard={par.pp_reshard!r}: choose one of {list(PP_RESHARD)}")
    if par.fc2_shard_dim not in (0, 1):
        raise ConfigError(f"parallel.fc2_shard_dim={par.fc2_shard_dim}: 1 (along 4d, the paper's) or 0 (along d)")
    if par.virtual_stages < 1 or (par.virtual_stages > 1 and par.schedule != "interleaved1f1b"):
        raise ConfigError("parallel.virtual_stages > 1 needs parallel.schedule=interleaved1f1b")
    n_chunks, n_blocks = topo.pp * par.virtual_stages, 2 * cfg.model.n_layers
    if n_chunks > n_blocks:
        raise ConfigError(
            f"pp={topo.pp} × virtual_stages={par.virtual_stages} = {n_chunks} stages but the model has only "
            f"{n_blocks} resblocks; lower parallel.topology pp or parallel.virtual_stages"
        )
    _check_batch(cfg, topo)
    _check_data(cfg, topo)
    return topo


def _check_batch(cfg: PriorRunConfig, topo: Topology) -> None:
    batch, par = cfg.data.batch_size, cfg.parallel
    if batch % topo.dp_size:
        raise ConfigError(
            f"data.batch_size={batch} is the global batch and must divide evenly over replicate × shard = "
            f"{topo.dp_size} data-parallel ranks; e.g. --data.batch_size {topo.dp_size * max(1, batch // topo.dp_size)}"
        )
    local = batch // topo.dp_size
    if topo.pp > 1 and local % par.n_microbatches:
        raise ConfigError(
            f"the per-rank batch {local} (data.batch_size / dp) does not split into parallel.n_microbatches="
            f"{par.n_microbatches}; pick a divisor of {local}"
        )
    if topo.pp > 1 and par.schedule == "1f1b" and par.n_microbatches < topo.pp:
        raise ConfigError(f"1F1B needs parallel.n_microbatches >= pp ({topo.pp}) to fill the pipeline")


def _check_data(cfg: PriorRunConfig, topo: Topology) -> None:
    """The prior reads ``random`` batches, a ``folder`` of pairs (through a dVAE) or pretokenized ``tokens``."""
    data = cfg.data
    if data.source == "shards":
        raise ConfigError(
            "the prior reads dVAE tokens, not images: run dalle-dist pretokenize --shards SHARDS --dvae "
            "runs/dvae/checkpoint.pt --out DIR, then train with --data.source tokens --data.shards DIR"
        )
    if data.source == "tokens":  # the dp ranks are replicate × shard: pp stages of a replica read the same shards
        check_shard_config(data, topo.dp_size)
