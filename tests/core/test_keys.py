"""Storage keys: the on-storage naming contract (docs/FORMAT.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcp_forge.core.keys import decode_ranks, encode_ranks, parse_storage_key, storage_key
from dcp_forge.core.patterns import SharingPattern
from dcp_forge.core.topology import Topology
from tests.support.strategies import layouts, topologies


@given(st.sets(st.integers(0, 2000), min_size=1, max_size=60))
def test_rank_lists_round_trip(ranks):
    text = encode_ranks(ranks)
    assert decode_ranks(text) == tuple(sorted(ranks))
    assert encode_ranks(decode_ranks(text)) == text


@given(st.data())
def test_storage_keys_round_trip_for_every_pattern(data):
    topo = data.draw(topologies())
    for rank in range(topo.world_size):
        here = topo.with_rank(rank)
        for name, layout in data.draw(layouts(topo)).items():
            key = storage_key(name, layout.pattern, here, layout.group_name)
            parsed = parse_storage_key(key)
            assert parsed.component == name
            assert str(parsed) == key
            if layout.pattern is SharingPattern.PER_RANK:
                assert parsed.rank == rank
            elif layout.pattern is SharingPattern.PER_NODE:
                assert parsed.node == topo.node_of_rank[rank]
            elif layout.pattern is SharingPattern.PER_GROUP:
                assert parsed.group_ranks == topo.group_of(layout.group_name, rank)
            else:
                assert parsed.pattern is None and key == name


def test_documented_examples():
    topo = Topology.uniform(3, 8, ranks_per_node=4, groups={"pp_group": [[0, 2, 4, 6], [1, 3, 5, 7]],
                                                            "dp": [[0, 1, 2, 3], [4, 5, 6, 7]]})
    assert storage_key("rng", SharingPattern.PER_RANK, topo) == "rng@rank3"
    assert storage_key("cache", SharingPattern.PER_NODE, topo, rank=5) == "cache@node1"
    assert storage_key("model", SharingPattern.PER_GROUP, topo, "pp_group", rank=0) == "model@pp_group[0-6:2]"
    assert storage_key("data", SharingPattern.PER_GROUP, topo, "dp") == "data@dp[0-3]"
    assert storage_key("model", SharingPattern.REPLICATED, topo) == "model"
    assert encode_ranks([0, 5, 7]) == "0,5,7"


@pytest.mark.parametrize("bad", ["", "x@", "x@rank", "x@rank01", "x@node-1", "x@g[0-3:1]", "x@g[3-1]",
                                 "x@g[1,0]", "x.y", "../x", "x@what5"])
def test_malformed_keys_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_storage_key(bad)
