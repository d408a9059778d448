"""What a PER_RANK / PER_NODE / PER_GROUP component does when the job's layout changed since the save.

Such a component holds one copy per rank (node, group). When a job resumes with another world size,
node layout or group layout, the saved copies no longer map one-to-one onto the ranks; each component
says what to do through ``StateComponent(on_topology_change=...)``:

============ ============================================================================================
``"error"``  raise ``TopologyChangeError`` naming the component, the saved and the current topology
             (the default for required components)
``"skip"``   keep the component's fresh state, with a warning (optional components only; their default)
``"rank0"``  every rank loads the copy saved rank 0 held (node 0's, the group holding rank 0)
``"reseed"`` like ``"rank0"``, then ``stateful.reseed(rank)`` derives a distinct, deterministic state
             per new rank from it (``RNGState.reseed``)
a callable   ``fn(new_rank, saved, current) -> saved rank | None``: each new rank loads the copy the
             returned saved rank held; ``None`` keeps that rank's fresh state (optional components only)
============ ============================================================================================

``saved`` and ``current`` are ``Topology`` objects. A policy only acts when the layout the component
depends on changed (PER_RANK: world size; PER_NODE: the node of each rank; PER_GROUP: its groups);
otherwise each rank loads its own copy. Every policy resolves on every rank identically, from the
manifest's topology and the current one, so a decision never needs a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..errors import ComponentDeclarationError, TopologyChangeError, describe_type

if TYPE_CHECKING:
    from .topology import Topology

# (new_rank, saved topology, current topology) -> the saved rank whose copy new_rank loads, or None.
CopyMapper = Callable[[int, "Topology", "Topology"], "int | None"]


class PolicyKind(Enum):
    ERROR = "error"
    SKIP = "skip"
    RANK0 = "rank0"
    RESEED = "reseed"
    REMAP = "remap"  # a user callable; spelled by passing the callable itself


@dataclass(frozen=True)
class TopologyPolicy:
    """A resolved ``on_topology_change`` value: a kind and, for REMAP, the user's mapper."""

    kind: PolicyKind
    mapper: CopyMapper | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, PolicyKind):
            raise ComponentDeclarationError(f"'kind' must be a PolicyKind (got {describe_type(self.kind)})")
        if (self.kind is PolicyKind.REMAP) != (self.mapper is not None):
            raise ComponentDeclarationError(
                f"a mapper is required for a remap policy and only for it (got kind {self.kind.value!r}, "
                f"mapper {self.mapper!r})")
        if self.mapper is not None and not callable(self.mapper):
            raise ComponentDeclarationError(f"'mapper' must be callable (got {describe_type(self.mapper)})")

    @classmethod
    def coerce(cls, value: TopologyPolicy | str | CopyMapper, *, component: str) -> TopologyPolicy:
        """Accept a policy, one of the names above, or a mapper callable."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                kind = PolicyKind(value.lower())
            except ValueError:
                kind = None
            if kind is not None and kind is not PolicyKind.REMAP:
                return cls(kind)
        elif callable(value):
            return cls(PolicyKind.REMAP, value)
        names = ", ".join(repr(k.value) for k in PolicyKind if k is not PolicyKind.REMAP)
        raise ComponentDeclarationError(
            f"'on_topology_change' of component {component!r} must be one of {names} or a callable "
            f"(new_rank, saved, current) -> saved rank (got {describe_type(value)})")

    @property
    def name(self) -> str:
        """A stable spelling for logs and cross-rank comparison (callables by qualified name)."""
        if self.mapper is None:
            return self.kind.value
        return f"remap({getattr(self.mapper, '__qualname__', type(self.mapper).__name__)})"

    def check_declaration(self, component: str, required: bool, stateful: Any) -> None:
        """Reject combinations that can never work, when the StateComponent is built."""
        if self.kind is PolicyKind.SKIP and required:
            raise ComponentDeclarationError(
                f"component {component!r} is required, so on_topology_change='skip' (keep fresh state) is not "
                "allowed; declare it required=False, or choose 'error', 'rank0' or a mapping callable")
        if self.kind is PolicyKind.RESEED and not callable(getattr(stateful, "reseed", None)):
            raise ComponentDeclarationError(
                f"on_topology_change='reseed' for component {component!r} needs a stateful with a "
                f"reseed(rank) method, like RNGState (got {describe_type(stateful)})")

    def source_rank(self, new_rank: int, saved: Topology, current: Topology, *, component: str) -> int | None:
        """The saved rank whose copy ``new_rank`` loads; None keeps its fresh state."""
        if self.kind in (PolicyKind.RANK0, PolicyKind.RESEED):
            return 0
        if self.kind is PolicyKind.SKIP:
            return None
        if self.kind is PolicyKind.ERROR:
            raise RuntimeError("an 'error' policy has no source rank")  # callers raise before asking
        source = self.mapper(new_rank, saved, current)  # type: ignore[misc]
        if source is None:
            return None
        if not isinstance(source, int) or isinstance(source, bool) or not 0 <= source < saved.world_size:
            raise TopologyChangeError(
                f"on_topology_change mapper {self.name} of component {component!r} returned "
                f"{describe_type(source)} for new rank {new_rank}; expected a saved rank in "
                f"[0, {saved.world_size}) or None")
        return source


def resolve_policy(value: TopologyPolicy | None, *, required: bool) -> TopologyPolicy:
    """The policy in force: the declared one, else 'error' for required and 'skip' for optional."""
    if value is not None:
        return value
    return TopologyPolicy(PolicyKind.ERROR if required else PolicyKind.SKIP)
