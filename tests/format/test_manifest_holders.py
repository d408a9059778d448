"""The manifest's holders of each copy: named by a namespaced storage key, implied by a plain one only
for GLOBAL and REPLICATED components, refused for a plain key under any other declaration."""

from __future__ import annotations

import pytest

from dcp_forge.core.components import ComponentLayout
from dcp_forge.core.keys import storage_key
from dcp_forge.core.patterns import SharingPattern
from dcp_forge.core.topology import Topology
from dcp_forge.errors import ComponentDeclarationError
from dcp_forge.format.index import ItemRecord
from dcp_forge.format.manifest import component_manifests

TOPOLOGY = Topology.uniform(0, 8, ranks_per_node=4, groups={"dp": [[0, 2, 4, 6], [1, 3, 5, 7]]})
NAMESPACED = (SharingPattern.PER_RANK, SharingPattern.PER_NODE, SharingPattern.PER_GROUP)


def _record(key: str, pattern: SharingPattern, rank: int) -> ItemRecord:
    return ItemRecord(component="opt", pattern=pattern.value, storage_key=key, fqn=f"{key}.step", kind="bytes",
                      dtype=None, shape=None, chunk_offsets=None, chunk_sizes=None, file=f"__{rank}_0.distcp",
                      offset=0, length=16, checksum="0123456789abcdef", rank=rank)


def _holders(key: str, pattern: SharingPattern, rank: int) -> list[int]:
    layout = ComponentLayout("opt", pattern, "dp" if pattern is SharingPattern.PER_GROUP else None)
    manifests = component_manifests([_record(key, pattern, rank)], {"opt": layout}, TOPOLOGY)
    return manifests["opt"].copies[key].holders


@pytest.mark.parametrize("pattern", list(SharingPattern))
@pytest.mark.parametrize("rank", [0, 5])
def test_every_pattern_names_the_ranks_holding_each_copy(pattern: SharingPattern, rank: int) -> None:
    key = storage_key("opt", pattern, TOPOLOGY, "dp" if pattern is SharingPattern.PER_GROUP else None, rank=rank)
    expected = {SharingPattern.PER_RANK: [rank], SharingPattern.PER_NODE: [r for r in range(8) if r // 4 == rank // 4],
                SharingPattern.PER_GROUP: [r for r in range(8) if r % 2 == rank % 2],
                SharingPattern.GLOBAL: [0], SharingPattern.REPLICATED: list(range(8))}[pattern]
    assert _holders(key, pattern, rank) == expected


@pytest.mark.parametrize("pattern", NAMESPACED)
def test_a_plain_key_under_a_namespaced_declaration_is_refused(pattern: SharingPattern) -> None:
    # A plain key says nothing about which rank, node or group holds the copy: the manifest would
    # record holders [None] or [] for it, a manifest its own cross-check could not make sense of.
    with pytest.raises(ComponentDeclarationError, match=rf"'opt'.*declared {pattern.value}"):
        _holders("opt", pattern, 3)
