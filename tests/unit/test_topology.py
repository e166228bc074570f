"""Topology arithmetic: validation with the arithmetic in the message, coordinates, data-parallel ranks."""

import pytest

from dalle_dist.config import ConfigError
from dalle_dist.parallel.topology import Topology


def test_parse_and_sizes():
    t = Topology.parse("pp=2, replicate=64,shard=8")
    assert t == Topology(2, 64, 8)
    assert (t.world_size, t.dp_size) == (1024, 512)
    assert Topology.parse("shard=4") == Topology(1, 1, 4)


@pytest.mark.parametrize("spec", ["pp=2,tp=2", "pp=two", "pp=0", "replicate"])
def test_parse_refuses(spec):
    with pytest.raises(ConfigError):
        Topology.parse(spec)


def test_check_shows_arithmetic():
    with pytest.raises(ConfigError, match=r"pp=2 × replicate=2 × shard=2 = 8 processes, but 4 were started"):
        Topology(2, 2, 2).check(4)
    Topology(2, 1, 2).check(4)


def test_coords_shard_innermost_and_dp_ranks():
    t = Topology(pp=2, replicate=2, shard=2)
    coords = [t.coords(r) for r in range(8)]
    assert coords[:4] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert coords[4] == (1, 0, 0)
    # Stages of one pipeline share data: rank r and r + 4 have the same dp rank.
    assert [t.dp_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert sorted({t.dp_rank(r) for r in range(8)}) == list(range(t.dp_size))
    with pytest.raises(ValueError):
        t.coords(8)
