"""Who is where: the frozen view of the job every planning function takes as input.

A ``Topology`` holds, for the whole job, each rank's node and each named group's members. Group and
node identity are derived from global ranks (a group *is* its sorted global ranks; a node is numbered
by its lowest rank), never from object ids or creation order, so a restarted job finds its copies.

Building one by hand is pure (tests simulate 8-rank jobs in one process); ``gather_topology`` is the
only function here that talks to torch.distributed.
"""

from __future__ import annotations

import os
import socket
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ComponentDeclarationError, describe_type
from .patterns import SharingPattern, validate_component_key

Ranks = tuple[int, ...]


def _check_rank_list(ranks: Sequence[int], world_size: int, what: str) -> Ranks:
    out = tuple(sorted(int(r) for r in ranks))
    if not out:
        raise ComponentDeclarationError(f"{what} must not be empty")
    if len(set(out)) != len(out) or out[0] < 0 or out[-1] >= world_size:
        raise ComponentDeclarationError(
            f"{what} must hold distinct ranks in [0, {world_size}) (got {list(ranks)})"
        )
    return out


@dataclass(frozen=True)
class Topology:
    """The job's layout, as seen from ``rank``.

    ``node_of_rank[r]`` is rank r's node index (nodes numbered 0.. by their lowest rank).
    ``groups[name]`` lists every group of that name as sorted global ranks, groups ordered by their
    lowest rank; each rank belongs to at most one group per name.
    """

    rank: int
    world_size: int
    node_of_rank: Ranks = ()
    groups: Mapping[str, tuple[Ranks, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("rank", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ComponentDeclarationError(f"{name!r} must be <int> (got {describe_type(value)})")
        if self.world_size < 1:
            raise ComponentDeclarationError(f"'world_size' must be >= 1 (got {self.world_size})")
        if not 0 <= self.rank < self.world_size:
            raise ComponentDeclarationError(
                f"'rank' must be in [0, {self.world_size}) (got {self.rank})"
            )
        nodes = tuple(self.node_of_rank) or (0,) * self.world_size
        if len(nodes) != self.world_size:
            raise ComponentDeclarationError(
                f"'node_of_rank' must give a node for each of {self.world_size} ranks (got {len(nodes)})"
            )
        object.__setattr__(self, "node_of_rank", _renumber_nodes(nodes))
        normalised: dict[str, tuple[Ranks, ...]] = {}
        for name, member_lists in dict(self.groups).items():
            validate_component_key(name, field_name="process group name")
            groups = sorted(
                {_check_rank_list(m, self.world_size, f"group {name!r}") for m in member_lists}
            )
            seen: set[int] = set()
            for g in groups:
                if seen & set(g):
                    raise ComponentDeclarationError(
                        f"groups named {name!r} overlap: rank(s) {sorted(seen & set(g))} are in more "
                        f"than one of {[list(x) for x in groups]}"
                    )
                seen |= set(g)
            normalised[name] = tuple(groups)
        object.__setattr__(self, "groups", types.MappingProxyType(dict(sorted(normalised.items()))))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # A value: it travels to an upload process inside the save planner (the read-only groups
        # mapping does not pickle as such).
        return (Topology, (self.rank, self.world_size, self.node_of_rank,
                           {name: groups for name, groups in self.groups.items()}))

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def single(cls) -> Topology:
        return cls(rank=0, world_size=1)

    @classmethod
    def uniform(cls, rank: int, world_size: int, ranks_per_node: int | None = None,
                groups: Mapping[str, Sequence[Sequence[int]]] | None = None) -> Topology:
        """A job of equal nodes with contiguous ranks, as torchrun lays them out."""
        per_node = ranks_per_node or world_size
        if world_size % per_node:
            raise ComponentDeclarationError(
                f"'ranks_per_node' must divide world_size {world_size} (got {per_node})"
            )
        return cls(rank=rank, world_size=world_size,
                   node_of_rank=tuple(r // per_node for r in range(world_size)),
                   groups={k: tuple(tuple(g) for g in v) for k, v in (groups or {}).items()})

    def with_rank(self, rank: int) -> Topology:
        """The same job seen from another rank (planning tests simulate every rank this way)."""
        return Topology(rank=rank, world_size=self.world_size, node_of_rank=self.node_of_rank,
                        groups=self.groups)

    # --- queries -----------------------------------------------------------------------------
    @property
    def node(self) -> int:
        return self.node_of_rank[self.rank]

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_rank) + 1

    def ranks_on_node(self, node: int) -> Ranks:
        return tuple(r for r, n in enumerate(self.node_of_rank) if n == node)

    def group_of(self, name: str, rank: int | None = None) -> Ranks:
        """The members of the group called ``name`` that holds ``rank`` (default: this rank)."""
        rank = self.rank if rank is None else rank
        if name not in self.groups:
            raise ComponentDeclarationError(
                f"process group {name!r} is not known on rank {self.rank}; known groups: "
                f"{sorted(self.groups) or 'none'} (pass it in process_groups / get_process_groups())"
            )
        for members in self.groups[name]:
            if rank in members:
                return members
        raise ComponentDeclarationError(f"rank {rank} is not a member of any group named {name!r}")

    def replica_set(self, pattern: SharingPattern, group_name: str | None = None,
                    rank: int | None = None) -> Ranks:
        """The ranks holding the same copy of a component as ``rank`` does."""
        rank = self.rank if rank is None else rank
        if pattern is SharingPattern.GLOBAL:
            return (0,)
        if pattern is SharingPattern.REPLICATED:
            return tuple(range(self.world_size))
        if pattern is SharingPattern.PER_RANK:
            return (rank,)
        if pattern is SharingPattern.PER_NODE:
            return self.ranks_on_node(self.node_of_rank[rank])
        if group_name is None:
            raise ComponentDeclarationError("a PER_GROUP replica set needs a process group name")
        return self.group_of(group_name, rank)

    def describe(self, group_names: Sequence[str] | None = None) -> str:
        """``world_size=4, nodes=2, pp_group=[[0, 2], [1, 3]]`` (all groups unless named)."""
        text = f"world_size={self.world_size}, nodes={self.num_nodes}"
        for name in sorted(self.groups) if group_names is None else group_names:
            groups = self.groups.get(name)
            text += f", {name}={[list(g) for g in groups] if groups is not None else 'absent'}"
        return text

    # --- serialisation (manifest) ------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "num_nodes": self.num_nodes,
            "node_of_rank": list(self.node_of_rank),
            "groups": {k: [list(g) for g in v] for k, v in self.groups.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], rank: int = 0) -> Topology:
        return cls(rank=rank, world_size=int(data["world_size"]),
                   node_of_rank=tuple(data.get("node_of_rank") or ()),
                   groups={k: tuple(tuple(g) for g in v) for k, v in (data.get("groups") or {}).items()})


def _renumber_nodes(labels: Sequence[Any]) -> Ranks:
    """Number nodes 0.. in order of their lowest rank, whatever labels identified them."""
    order: dict[Any, int] = {}
    for label in labels:
        order.setdefault(label, len(order))
    return tuple(order[label] for label in labels)


def local_node_label(node: int | str | None = None) -> Any:
    """This process's node identity: given, else torchrun's LOCAL_RANK layout, else the host name."""
    if node is not None:
        return ("given", node)
    local_rank = os.environ.get("LOCAL_RANK")
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    global_rank = os.environ.get("RANK")
    if local_rank is not None and local_world is not None and global_rank is not None:
        # torchrun gives each node a contiguous block of ranks: its first rank names the node.
        return ("first_rank", int(global_rank) - int(local_rank))
    return ("host", socket.gethostname())


def gather_topology(process_groups: Mapping[str, Any] | None = None, *, node: int | str | None = None,
                    group: Any = None) -> Topology:
    """Collective: every rank calls this with its own view; returns the same job on every rank.

    ``process_groups`` maps names to ``ProcessGroup`` objects (or anything ``dist.get_process_group_ranks``
    accepts). ``group`` is the process group the gathering runs over (default: the world).
    """
    import torch.distributed as dist

    process_groups = dict(process_groups or {})
    if not (dist.is_available() and dist.is_initialized()):
        if any(pg is not None for pg in process_groups.values()):
            raise ComponentDeclarationError(
                "process_groups were given but torch.distributed is not initialised"
            )
        return Topology(rank=0, world_size=1,
                        groups={name: ((0,),) for name in process_groups})
    mine = {
        "node": local_node_label(node),
        "groups": {name: sorted(dist.get_process_group_ranks(pg)) for name, pg in process_groups.items()},
    }
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    names = set(mine["groups"])
    for r, view in enumerate(everyone):
        if set(view["groups"]) != names:
            raise ComponentDeclarationError(
                f"ranks disagree on process group names: rank {dist.get_rank()} has {sorted(names)}, "
                f"rank {r} has {sorted(view['groups'])}"
            )
    groups = {name: tuple(tuple(v["groups"][name]) for v in everyone) for name in names}
    for name, lists in groups.items():
        for r, members in enumerate(lists):
            if r not in members:
                raise ComponentDeclarationError(
                    f"rank {r} passed a group {name!r} it is not a member of: {list(members)}"
                )
    return Topology(rank=dist.get_rank(), world_size=len(everyone),
                    node_of_rank=_renumber_nodes([v["node"] for v in everyone]), groups=groups)
