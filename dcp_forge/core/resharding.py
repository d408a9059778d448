"""Loading on a changed topology: which saved copy each rank loads, and one line saying so (pure).

GLOBAL and REPLICATED components hold one logical value: every rank loads it whatever the world size,
and DTensor values reshard through DCP's chunk metadata. PER_RANK / PER_NODE / PER_GROUP components
hold one copy per rank / node / group; when the layout they depend on changed since the save, their
``on_topology_change`` policy (topology_policy.py) decides which copy each new rank loads.

Everything here is a pure function of the component declaration, the saved topology (from the
manifest) and the current one, so every rank reaches the same decision without communicating, and an
N → M resume is testable in one process for any N and M.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..errors import TopologyChangeError
from .components import StateComponent
from .keys import storage_key
from .patterns import SharingPattern
from .topology import Topology
from .topology_policy import PolicyKind

_PER_COPY = (SharingPattern.PER_RANK, SharingPattern.PER_NODE, SharingPattern.PER_GROUP)


def layout_changed(pattern: SharingPattern, group_name: str | None, saved: Topology, current: Topology) -> bool:
    """Whether the layout a component's copies depend on differs between save and now."""
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        return saved.world_size != current.world_size
    if saved.world_size != current.world_size:
        return True
    if pattern is SharingPattern.PER_NODE:
        return saved.node_of_rank != current.node_of_rank
    if pattern is SharingPattern.PER_GROUP:
        return saved.groups.get(group_name or "") != current.groups.get(group_name or "")
    return False


@dataclass(frozen=True)
class CopyAssignment:
    """How one component maps onto a changed topology, for every current rank.

    ``sources[r]``: the saved rank whose copy current rank ``r`` loads (None: it keeps fresh state);
    ``storage_keys[r]``: that copy's storage key. GLOBAL/REPLICATED components have no sources: every
    rank loads the one logical value.
    """

    component: str
    pattern: SharingPattern
    policy: str
    saved: str
    current: str
    sources: tuple[int | None, ...] = ()
    storage_keys: tuple[str | None, ...] = ()
    reseed: bool = False

    def storage_key_for(self, rank: int) -> str | None:
        return self.storage_keys[rank]

    def log_line(self, holds_dtensors: bool | None = None) -> str:
        """One line saying what the load did about the change. For a GLOBAL / REPLICATED component,
        ``holds_dtensors`` says whether any of its loaded values is a DTensor (None: not known yet)."""
        head = (f"component {self.component!r} ({self.pattern.name}): saved with {self.saved}, "
                f"now {self.current}")
        if self.pattern not in _PER_COPY:
            if holds_dtensors is None:
                return (f"{head}: every rank loads the one saved value (DTensor values reshard to the current "
                        "placement, other values load as saved)")
            if holds_dtensors:
                return (f"{head}: every rank loads the one saved value; its DTensor values reshard to the "
                        "current placement, other values load as saved")
            return f"{head}: every rank loads the one saved value as saved (it holds no DTensor, nothing reshards)"
        if all(s is None for s in self.sources):
            return f"{head}: policy {self.policy}, every rank keeps its fresh state"
        if all(s == 0 for s in self.sources):
            action = f"every rank loads the copy saved rank 0 held ({self.storage_keys[0]})"
        else:
            shown = [f"{r}<-{k or 'fresh'}" for r, k in enumerate(self.storage_keys[:8])]
            more = f" ... ({len(self.storage_keys) - 8} more)" if len(self.storage_keys) > 8 else ""
            action = "ranks load " + ", ".join(shown) + more
        if self.reseed:
            action += ", then reseeds it with its own rank"
        return f"{head}: policy {self.policy}, {action}"


def assign_copies(component: StateComponent, saved: Topology, current: Topology) -> CopyAssignment | None:
    """The copy every current rank loads, or None when the component's layout did not change.

    Raises ``TopologyChangeError`` under the 'error' policy, naming the component and both
    topologies, and when the checkpoint lacks what the policy needs (e.g. a PER_GROUP group name).
    """
    pattern, group = component.sharing_pattern, component.process_group_name
    if not layout_changed(pattern, group, saved, current):
        return None
    policy = component.topology_policy
    assignment = CopyAssignment(component=component.key, pattern=pattern, policy=policy.name,
                                saved=saved.describe([group] if group else []),
                                current=current.describe([group] if group else []))
    if pattern not in _PER_COPY:
        return assignment
    if policy.kind is PolicyKind.ERROR:
        raise TopologyChangeError(
            f"{pattern.name} component {component.key!r} was saved with topology {assignment.saved} but this "
            f"job has {assignment.current}; its per-copy state cannot be mapped onto the new layout. Choose "
            "what to do with StateComponent(on_topology_change=...): 'rank0', 'skip' (optional components), "
            "'reseed' (RNG state) or a callable (new_rank, saved, current) -> saved rank; see docs/RESHARDING.md")
    if pattern is SharingPattern.PER_GROUP and group not in saved.groups:
        raise TopologyChangeError(
            f"PER_GROUP component {component.key!r}: the checkpoint's topology has no group {group!r} "
            f"(it has {sorted(saved.groups) or 'none'}), so its saved copies cannot be located")
    sources = tuple(policy.source_rank(r, saved, current, component=component.key)
                    for r in range(current.world_size))
    keys = tuple(None if s is None else storage_key(component.key, pattern, saved, group, rank=s)
                 for s in sources)
    return replace(assignment, sources=sources, storage_keys=keys, reseed=policy.kind is PolicyKind.RESEED)


def assign_all(components: Sequence[StateComponent], saved: Topology | None,
               current: Topology) -> dict[str, CopyAssignment]:
    """``assign_copies`` for each component whose layout changed (none when the save topology is unknown)."""
    if saved is None:
        return {}
    out = {}
    for c in components:
        assignment = assign_copies(c, saved, current)
        if assignment is not None:
            out[c.key] = assignment
    return out
