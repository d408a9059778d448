"""How a piece of training state is shared across ranks: the declaration users write.

A ``StateComponent`` names one stateful object (model, optimizer, scheduler, dataloader, RNG ...)
and its ``SharingPattern``. Everything else in dcp_forge (storage keys, who writes what, who loads
what) is derived from these declarations, so they validate themselves when built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ComponentDeclarationError, DeclarationTypeError, describe_type, expect_type
from .patterns import MISMATCH_ACTIONS, SharingPattern, ValidationLevel, validate_component_key
from .topology_policy import CopyMapper, TopologyPolicy, resolve_policy


@dataclass
class StateComponent:
    """One checkpointable piece of state and how it is shared across ranks."""

    key: str
    stateful: Any
    sharing_pattern: SharingPattern
    process_group_name: str | None = None
    required: bool = True
    validate_replication: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    validation_level: ValidationLevel = ValidationLevel.TENSOR
    on_replication_mismatch: str = "raise"
    # PER_RANK / PER_NODE / PER_GROUP only: what to do when the job's layout changed (topology_policy.py).
    on_topology_change: TopologyPolicy | str | CopyMapper | None = None

    def __post_init__(self) -> None:
        validate_component_key(self.key)
        self.sharing_pattern = SharingPattern.coerce(self.sharing_pattern)
        self.validation_level = ValidationLevel.coerce(self.validation_level)
        if not (callable(getattr(self.stateful, "state_dict", None))
                and callable(getattr(self.stateful, "load_state_dict", None))):
            raise DeclarationTypeError(
                f"'stateful' of component {self.key!r} must have state_dict() and load_state_dict() "
                f"(got {describe_type(self.stateful)})"
            )
        for name in ("required", "validate_replication"):
            expect_type(name, getattr(self, name), bool, owner=f" of component {self.key!r}")
        if self.validate_replication and self.sharing_pattern in (SharingPattern.GLOBAL, SharingPattern.PER_RANK):
            raise ComponentDeclarationError(
                f"'validate_replication' of component {self.key!r} needs copies to compare: it applies to "
                f"REPLICATED, PER_GROUP and PER_NODE, not {self.sharing_pattern.name}")
        if self.on_replication_mismatch not in MISMATCH_ACTIONS:
            raise ComponentDeclarationError(
                f"'on_replication_mismatch' of component {self.key!r} must be one of {list(MISMATCH_ACTIONS)} "
                f"(got {describe_type(self.on_replication_mismatch)})"
            )
        expect_type("metadata", self.metadata, dict, owner=f" of component {self.key!r}")
        if self.sharing_pattern is SharingPattern.PER_GROUP:
            if self.process_group_name is None:
                raise ComponentDeclarationError(
                    f"'process_group_name' is required for PER_GROUP component {self.key!r}"
                )
            validate_component_key(self.process_group_name, field_name="process_group_name")
        elif self.process_group_name is not None:
            raise ComponentDeclarationError(
                f"'process_group_name' is only meaningful for PER_GROUP; component {self.key!r} is "
                f"{self.sharing_pattern.name} (got process_group_name={self.process_group_name!r})"
            )
        if self.on_topology_change is not None:
            if self.sharing_pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
                raise ComponentDeclarationError(
                    f"'on_topology_change' only applies to PER_RANK, PER_NODE and PER_GROUP components; "
                    f"{self.sharing_pattern.name} component {self.key!r} loads on every rank whatever the "
                    "topology (DTensors reshard)")
            self.on_topology_change = TopologyPolicy.coerce(self.on_topology_change, component=self.key)
        self.topology_policy.check_declaration(self.key, self.required, self.stateful)

    @property
    def topology_policy(self) -> TopologyPolicy:
        """The policy in force: the declared one, else 'error' if required, 'skip' if optional."""
        value = self.on_topology_change
        return resolve_policy(value if isinstance(value, TopologyPolicy) else None, required=self.required)

    @property
    def layout(self) -> ComponentLayout:
        return ComponentLayout(self.key, self.sharing_pattern, self.process_group_name)

    @property
    def declaration(self) -> tuple[str, str, str | None, bool, bool, str, str, str]:
        """What must agree across ranks: key, pattern, group name, required, how replication is checked
        (the check is collective: ranks that disagree on it would wait for each other forever), and the
        topology policy (ranks must take the same copies on a changed topology)."""
        return (self.key, self.sharing_pattern.value, self.process_group_name, self.required,
                self.validate_replication, self.validation_level.value, self.on_replication_mismatch,
                self.topology_policy.name)


@dataclass(frozen=True)
class ComponentLayout:
    """The part of a declaration planning needs: a key, its pattern and (PER_GROUP) its group."""

    key: str
    pattern: SharingPattern
    group_name: str | None = None


LayoutSpec = Iterable["StateComponent"] | Mapping[str, "SharingPattern | str | tuple[SharingPattern | str, str]"]


def layouts_from(spec: LayoutSpec | None) -> dict[str, ComponentLayout]:
    """Normalise StateComponents, or a ``{key: pattern}`` / ``{key: (pattern, group)}`` mapping."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        out: dict[str, ComponentLayout] = {}
        for key, value in spec.items():
            validate_component_key(key)
            pattern, group = (value if isinstance(value, tuple) else (value, None))
            pattern = SharingPattern.coerce(pattern, field_name=f"pattern of {key!r}")
            if (pattern is SharingPattern.PER_GROUP) != (group is not None):
                raise ComponentDeclarationError(
                    f"component {key!r}: a process group name is required for PER_GROUP and only for it "
                    f"(got pattern {pattern.name}, group {group!r})"
                )
            out[key] = ComponentLayout(key, pattern, group)
        return out
    return {c.key: c.layout for c in validate_components(spec)}


def validate_components(components: Iterable[StateComponent]) -> list[StateComponent]:
    """Check a whole declaration: types and unique keys. Returns it as a list."""
    result: list[StateComponent] = []
    seen: set[str] = set()
    for index, component in enumerate(components):
        if not isinstance(component, StateComponent):
            raise DeclarationTypeError(
                f"state_components[{index}] must be a StateComponent (got {describe_type(component)})"
            )
        if component.key in seen:
            raise ComponentDeclarationError(
                f"'key' must be unique across state_components: {component.key!r} is declared twice"
            )
        seen.add(component.key)
        result.append(component)
    return result


def group_names(components: Sequence[StateComponent]) -> set[str]:
    return {c.process_group_name for c in components if c.process_group_name is not None}
