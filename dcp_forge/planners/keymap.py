"""Which storage key each top-level state-dict key is saved under, for one rank (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..core.components import ComponentLayout
from ..core.keys import storage_key
from ..core.patterns import SharingPattern
from ..core.topology import Topology
from ..errors import ComponentDeclarationError


def default_topology(layouts: Mapping[str, ComponentLayout]) -> Topology:
    """Rank and world size from torch.distributed (world of 1 without it).

    Node and group layouts need a collective to learn, which a planner must not start on its own;
    PER_NODE / PER_GROUP declarations therefore need an explicit ``topology=gather_topology(...)``.
    """
    import torch.distributed as dist

    needs_more = [k for k, lay in layouts.items()
                  if lay.pattern in (SharingPattern.PER_NODE, SharingPattern.PER_GROUP)]
    if dist.is_available() and dist.is_initialized():
        if needs_more:
            raise ComponentDeclarationError(
                f"components {needs_more} are PER_NODE/PER_GROUP: pass topology=gather_topology(...) "
                "to the planner (or use CheckpointCoordinator, which does)"
            )
        return Topology(rank=dist.get_rank(), world_size=dist.get_world_size())
    return Topology.single() if not needs_more else Topology(
        rank=0, world_size=1,
        groups={lay.group_name: ((0,),) for lay in layouts.values() if lay.group_name})


def storage_keys_for(keys: Iterable[str], layouts: Mapping[str, ComponentLayout],
                     topology: Topology) -> dict[str, str]:
    """``{state-dict key: storage key}`` for this rank; undeclared keys keep their name (DCP's rule)."""
    out: dict[str, str] = {}
    for key in keys:
        layout = layouts.get(key)
        out[key] = key if layout is None else storage_key(key, layout.pattern, topology, layout.group_name)
    return out


def holders_count(layout: ComponentLayout | None, topology: Topology) -> int:
    """How many ranks hold the same copy (undeclared keys are treated as replicated, like DCP)."""
    if layout is None:
        return topology.world_size
    return len(topology.replica_set(layout.pattern, layout.group_name))
