"""The process layout: pipeline stages × replicas × parameter shards, validated once and passed everywhere.

Mesh order is (pp, replicate, shard), so ``shard`` is the innermost (fastest-varying) dimension: with
``shard = GPUs per node`` the ranks that shard one replica's parameters are the GPUs of one machine, as in the
paper's Fig. 5 (intra-machine sharding, inter-machine replicas) [P §2.5]. Data is split over replicate × shard,
never over pp: the stages of one pipeline see the same samples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ConfigError

MESH_DIMS: tuple[str, str, str] = ("pp", "replicate", "shard")


@dataclass(frozen=True)
class Topology:
    """``pp`` pipeline stages × ``replicate`` data-parallel replicas × ``shard`` parameter shards per replica."""

    pp: int = 1
    replicate: int = 1
    shard: int = 1

    def __post_init__(self) -> None:
        for name in MESH_DIMS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"topology {name}={value!r} must be a positive integer")

    @classmethod
    def parse(cls, spec: str) -> Topology:
        """``"pp=2,replicate=64,shard=8"`` (any order, missing dims are 1) → Topology."""
        values: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
            if not m or m.group(1) not in MESH_DIMS:
                raise ConfigError(f"cannot read topology part {part!r}; write e.g. pp=2,replicate=64,shard=8")
            values[m.group(1)] = int(m.group(2))
        return cls(**values)

    @property
    def world_size(self) -> int:
        return self.pp * self.replicate * self.shard

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: every replica × shard rank reads different samples."""
        return self.replicate * self.shard

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.pp, self.replicate, self.shard)

    def check(self, world_size: int) -> None:
        """Refuse a topology that does not multiply out to the number of processes, showing the arithmetic."""
        if self.world_size != world_size:
            raise ConfigError(
                f"topology pp={self.pp} × replicate={self.replicate} × shard={self.shard} = {self.world_size} "
                f"processes, but {world_size} were started (torchrun --nnodes N --nproc-per-node G starts N·G). "
                f"Change the topology or the process count so that the product equals the world size."
            )

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, replicate_rank, shard_rank) of a global rank, in mesh order (shard innermost)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        pp_rank, rest = divmod(rank, self.replicate * self.shard)
        rep_rank, shard_rank = divmod(rest, self.shard)
        return pp_rank, rep_rank, shard_rank

    def dp_rank(self, rank: int) -> int:
        """Index of this rank's data slice among the dp_size slices (same for all stages of a pipeline)."""
        _, rep_rank, shard_rank = self.coords(rank)
        return rep_rank * self.shard + shard_rank

    def describe(self) -> str:
        return f"pp={self.pp},replicate={self.replicate},shard={self.shard}"


def build_mesh(topology: Topology, device_type: str = "cpu"):  # -> DeviceMesh
    """The DeviceMesh with dims (pp, replicate, shard); the default process group must already exist."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised default process group (init_process_group)")
    topology.check(dist.get_world_size())
    return init_device_mesh(device_type, topology.shape, mesh_dim_names=MESH_DIMS)
