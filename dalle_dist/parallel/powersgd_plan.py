"""PowerSGD planning and accounting: which gradients are compressed at what rank, the fixed Q, and the bytes a
replica reduction sends [P §2.5, App. E, Table 2]. :mod:`.powersgd` (the reducer) re-exports every public name.
"""

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dalle_dist.config import CommConfig

# Embeddings, unembeddings and the final LayerNorm keep fp32 gradients and skip compression [P D.2].
UNCOMPRESSED_PREFIXES: tuple[str, ...] = ("embed.", "head.")


# --------------------------------------------------------------------------------------------------
# Which matrices are compressed, and at what rank
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixPlan:
    """How one gradient is seen by PowerSGD: an (m, n) matrix with m ≤ n, compressed at rank r."""

    shape: torch.Size  # the gradient's own shape
    m: int
    n: int
    transpose: bool  # the (shape[0], rest) view is transposed so that m ≤ n [P E.2 notes]
    rank: int  # min(rank, m)


def _excluded(name: str, prefixes: Sequence[str]) -> bool:
    dotted = "." + name
    return any("." + p in dotted for p in prefixes)  # also matches wrapped names like "module.embed.x"


def compression_plan(
    shapes: Mapping[str, Sequence[int]],
    rank: int,
    min_compression_rate: float = 1.0,
    uncompressed_prefixes: Sequence[str] = UNCOMPRESSED_PREFIXES,
) -> tuple[dict[str, MatrixPlan], list[str]]:
    """Split gradients into compressed matrices and the uncompressed fp32 rest [P D.2, E.2(8)].

    Uncompressed: gains and biases (ndim < 2), names under ``uncompressed_prefixes`` (embeddings, unembeddings),
    and any matrix where r·(m + n)·min_compression_rate ≥ m·n (compression would not save bytes; torch's hook has
    the same option, and 0 compresses every eligible matrix, which the full-rank tests use).
    """
    if rank < 1:
        raise ValueError(f"PowerSGD rank must be >= 1; got {rank}")
    plans: dict[str, MatrixPlan] = {}
    rest: list[str] = []
    for name, shape in shapes.items():
        shape = torch.Size(shape)
        if len(shape) < 2 or _excluded(name, uncompressed_prefixes) or shape.numel() == 0:
            rest.append(name)
            continue
        rows, cols = shape[0], shape.numel() // shape[0]
        m, n = min(rows, cols), max(rows, cols)
        r = min(rank, m)
        if r * (m + n) * min_compression_rate >= m * n:
            rest.append(name)
            continue
        plans[name] = MatrixPlan(shape, m, n, rows > cols, r)
    return plans, rest


def resolve_rank(comm: CommConfig, d_model: int, shards: int = 1) -> int:
    """Rank per compressed matrix: ``powersgd_rank`` if > 0, else round(fraction · d_model), split over shards.

    The paper's rank is per machine: the 12B model uses 896 in total, 112 per GPU for its 8 shards [P B.2].
    """
    total = comm.powersgd_rank if comm.powersgd_rank > 0 else round(comm.powersgd_rank_fraction * d_model)
    return max(1, total // shards)


def fixed_q(name: str, n: int, rank: int, seed: int) -> Tensor:
    """The fixed Gaussian Q of one matrix, drawn at the start and never updated [P §2.5 fn 10]: (n, rank) fp32.

    Seeded by (seed, name) only, so it is identical on every replica and independent of the other parameters.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)
    return torch.randn(n, rank, generator=g)  # (n, r)


# --------------------------------------------------------------------------------------------------
# Bytes per step, Table 2's accounting [P E.1, Table 2]
# --------------------------------------------------------------------------------------------------


def resblock_shapes(d_model: int, n_layers: int, mlp_ratio: int = 4) -> list[tuple[int, int]]:
    """The compressed matrices of the prior, torch (out, in) layout: q, k, v, out (d×d), fc1, fc2 per layer."""
    h = mlp_ratio * d_model
    return [(d_model, d_model)] * 4 * n_layers + [(h, d_model), (d_model, h)] * n_layers


def powersgd_bytes(
    shapes: Iterable[tuple[int, int]], rank: int, shards: int = 1, bytes_per_el: int = 2
) -> dict[str, float]:
    """Per-GPU bytes of one replica reduction of ``shapes``, uncompressed vs PowerSGD [P Table 2].

    Each full matrix is sharded ``shards`` ways along its larger side (Table 2: axis 1, except the second MLP
    matrix on axis 0; these are the 4d sides), and each GPU compresses its shard at rank ``rank // shards``
    (12B: 896 → 112 [P B.2]), sending P and Q of (rows + cols)·r elements instead of rows·cols. The paper sends
    both in 16-bit formats (``bytes_per_el=2``). For the prior's resblocks the saved fraction is
    1 − r(m+2)/(2dm) with m = shards.
    """
    if rank % shards:
        raise ValueError(f"rank {rank} is not divisible by shards={shards}")
    r = rank // shards
    plain = packed = 0
    for rows, cols in shapes:
        big = max(rows, cols)
        if big % shards:
            raise ValueError(f"matrix {rows}×{cols} cannot be split {shards} ways along its larger side")
        a, b = min(rows, cols), big // shards  # shard sides
        plain += a * b
        packed += (a + b) * min(r, a, b)
    return {
        "bytes_uncompressed": plain * bytes_per_el,
        "bytes_powersgd": packed * bytes_per_el,
        "saved_fraction": 1 - packed / plain,
    }
