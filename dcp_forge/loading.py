"""What a load will read, per component, and what it reports back (pure; the coordinator wires it).

``decide_loads`` turns the declarations, the checkpoint's storage keys and topologies, strictness and
an optional selection (partial load) into a ``LoadDecision``: the components to load, the storage key
each is read from on this rank, and for every other component *why* it is not loaded. The coordinator
turns the decision and what the planner skipped into a ``LoadResult``, the value ``load_checkpoint``
returns, so a caller can always see what was not loaded.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .core.components import StateComponent
from .core.keys import parse_storage_key, storage_key
from .core.resharding import CopyAssignment, assign_all
from .core.topology import Topology
from .errors import (
    ComponentDeclarationError,
    MissingComponentError,
    UnexpectedComponentError,
    describe_type,
)
from .storage import redact_url


@dataclass(frozen=True)
class LoadSelection:
    """A partial load: only ``components`` (None: all declared), and within ``keys[c]`` only the state
    keys matching one of its glob patterns (relative to the component: ``"layers.0.*"``)."""

    components: frozenset[str] | None = None
    keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, globs in self.keys.items():
            if not globs:
                raise ComponentDeclarationError(
                    f"keys[{name!r}] is empty, which would load nothing of it: leave {name!r} out of keys= to "
                    "load all its keys, or out of components= to load none")
            if self.components is not None and name not in self.components:
                raise ComponentDeclarationError(
                    f"keys= selects keys of component {name!r}, which components= leaves out "
                    f"({sorted(self.components)})")
        object.__setattr__(self, "keys", types.MappingProxyType(dict(self.keys)))

    @classmethod
    def build(cls, declared: Sequence[str], components: Iterable[str] | None,
              keys: Mapping[str, Iterable[str]] | None) -> LoadSelection:
        """The caller's ``components=`` / ``keys=``, checked against the declared component keys."""
        selection = cls(_component_names(components),
                        {name: _glob_patterns(name, globs) for name, globs in (keys or {}).items()})
        _check_known(selection.components or (), declared, "components")
        _check_known(selection.keys, declared, "keys")
        return selection

    def includes(self, component: str) -> bool:
        return self.components is None or component in self.components


# A bare string is an Iterable[str] too, of its letters: both checks refuse it by name.
def _component_names(components: Iterable[str] | None) -> frozenset[str] | None:
    if components is None:
        return None
    names = components if isinstance(components, str) else frozenset(components)
    if isinstance(names, str) or not all(isinstance(c, str) for c in names):
        raise ComponentDeclarationError(
            f"'components' must be a collection of component keys (got {describe_type(names)})"
            + (f"; write components=[{names!r}]" if isinstance(names, str) else ""))
    return names


def _glob_patterns(name: str, globs: Iterable[str]) -> tuple[str, ...]:
    if isinstance(globs, str) or not all(isinstance(g, str) for g in globs):
        raise ComponentDeclarationError(f"keys[{name!r}] must be a list of glob patterns (got {describe_type(globs)})")
    return tuple(globs)


def _check_known(names: Iterable[str], known: Iterable[str], what: str) -> None:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ComponentDeclarationError(
            f"{what}= names components that are not declared: {unknown} (declared: {sorted(known)})")


@dataclass(frozen=True)
class LoadDecision:
    """What this rank loads. ``key_map``: component → storage key read; ``not_loaded``: component →
    why not; ``changes``: components whose topology changed; ``warnings``: to emit on this rank."""

    loading: tuple[StateComponent, ...]
    key_map: Mapping[str, str]
    not_loaded: Mapping[str, str]
    changes: Mapping[str, CopyAssignment]
    warnings: tuple[str, ...]

    @property
    def reseed(self) -> tuple[StateComponent, ...]:
        return tuple(c for c in self.loading if c.key in self.changes and self.changes[c.key].reseed)


def decide_loads(components: Sequence[StateComponent], saved_keys: set[str], saved_topology: Topology | None,
                 current: Topology, *, strict: bool, path: str, selection: LoadSelection = LoadSelection()
                 ) -> LoadDecision:
    """Decide, on this rank, which storage key each selected component loads from.

    Raises MissingComponentError for a required component absent from the checkpoint (strict), or
    UnexpectedComponentError for saved components nobody declared (strict, unless the caller selected
    components explicitly), and TopologyChangeError from the components' topology policies.
    """
    where = redact_url(path)
    saved_components = {parse_storage_key(k).component for k in saved_keys}
    declared = {c.key for c in components}
    warnings: list[str] = []
    not_loaded: dict[str, str] = {}
    unknown = sorted(saved_components - declared)
    if unknown:
        message = (f"checkpoint {where} holds components nobody declared: {unknown} "
                   f"(declared: {sorted(declared)})")
        if strict and selection.components is None:
            raise UnexpectedComponentError(message + "; pass strict=False to ignore them")
        if selection.components is None:
            warnings.append(message)
        not_loaded.update({k: "in the checkpoint but not declared" for k in unknown})
    selected = [c for c in components if selection.includes(c.key)]
    not_loaded.update({c.key: "not selected (components=)" for c in components if not selection.includes(c.key)})
    changes = assign_all(selected, saved_topology, current)
    loading: list[StateComponent] = []
    key_map: dict[str, str] = {}
    for c in selected:
        change = changes.get(c.key)
        if change is not None and change.storage_keys:
            key = change.storage_key_for(current.rank)
            if key is None:
                reason = f"topology changed; policy {change.policy} keeps its fresh state on rank {current.rank}"
                if c.required:
                    raise MissingComponentError(
                        f"component {c.key!r} is required but its policy {change.policy} gives rank "
                        f"{current.rank} no saved copy ({change.saved} -> {change.current})")
                not_loaded[c.key] = reason
                warnings.append(f"component {c.key!r}: {reason}")
                continue
        else:
            key = storage_key(c.key, c.sharing_pattern, current, c.process_group_name)
        if key in saved_keys:
            loading.append(c)
            key_map[c.key] = key
            continue
        message = (f"component {c.key!r} (rank {current.rank}) is not in checkpoint {where}: "
                   f"expected storage key {key!r}; the checkpoint has "
                   f"{sorted(k for k in saved_keys if parse_storage_key(k).component == c.key)[:4] or 'no copy of it'}")
        if c.required and strict:
            raise MissingComponentError(message + " (declare it required=False or load with strict=False)")
        warnings.append(message + "; keeping its current state")
        not_loaded[c.key] = f"not in the checkpoint (expected storage key {key!r})"
    return LoadDecision(tuple(loading), types.MappingProxyType(key_map), types.MappingProxyType(not_loaded),
                        types.MappingProxyType(changes), tuple(warnings))


@dataclass(frozen=True)
class LoadResult:
    """What ``load_checkpoint`` did on this rank. Path-like: ``os.fspath(result)`` is the checkpoint.

    ``loaded``: components whose state was loaded (maybe partly, see ``keys_not_loaded``);
    ``not_loaded``: component → why it was not (also components in the checkpoint nobody declared);
    ``keys_not_loaded``: component → state keys left at their current value (not selected by
    ``keys=``, or absent from the checkpoint under ``strict=False``); ``topology_changes``: one line
    per component whose topology changed, saying what the load did; ``bytes_read``: data bytes this
    rank read from storage (read-once loads get the rest from other ranks); ``tier``: with a
    ``LocalTier``, which tier the checkpoint was read from ("local" or "remote"; None without tiers).
    Plain values, so a result can be gathered from every rank (``all_gather_object``).
    """

    path: str
    loaded: tuple[str, ...]
    not_loaded: Mapping[str, str]
    keys_not_loaded: Mapping[str, tuple[str, ...]]
    topology_changes: tuple[str, ...]
    bytes_read: int
    read_once: bool
    tier: str | None = None

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    @property
    def complete(self) -> bool:
        """True when every declared component was loaded in full."""
        return not self.not_loaded and not self.keys_not_loaded

    def summary(self) -> str:
        """One line for logs: what was loaded and what was not."""
        where = f" from the {self.tier} tier" if self.tier else ""
        text = f"loaded {redact_url(self.path)}{where}: {', '.join(self.loaded) or 'nothing'}"
        if self.not_loaded:
            text += "; not loaded: " + "; ".join(f"{k} ({why})" for k, why in sorted(self.not_loaded.items()))
        for component, keys in sorted(self.keys_not_loaded.items()):
            text += f"; {component}: {len(keys)} key(s) kept their current value (e.g. {list(keys[:3])})"
        return text

