"""Providers written for the legacy API: ``get_statefuls_for_save()`` / ``get_statefuls_for_load()``.

Before ``get_state_components()``, a trainer handed its checkpoint code two dicts of Statefuls: what
to save and what to load (usually the same objects, minus what its arguments say not to restore),
and every rank saved them with plain DCP. Plain DCP treats a key that every rank saves as one value
and writes it once, which is the REPLICATED pattern; the one exception the migration guide insists
on is RNG state, which differs per rank (REPLICATED RNG state would give every rank the same
random numbers). So a legacy provider's components are:

- ``rng`` (or any ``RNGState``): PER_RANK;
- every other key: REPLICATED, unless ``patterns`` says otherwise;
- ``required`` when the key is also in ``get_statefuls_for_load()``; keys only saved are optional,
  and ``load_keys(provider)`` names what a load restores (pass it as ``components=``).

A provider that implements ``get_state_components()`` (returning anything but None) is taken at
its word, as the seeds' CheckpointManager does: the new API wins, the legacy one is the fallback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..coordinator import CheckpointCoordinator
from ..core.components import StateComponent
from ..core.patterns import SharingPattern
from ..errors import ComponentDeclarationError, DeclarationTypeError, describe_type
from ..rng import RNGState

__all__ = ["components_from_provider", "coordinator_from_provider", "load_keys", "process_groups_from_provider"]

PatternSpec = SharingPattern | str | tuple[SharingPattern | str, str]


def _new_api_components(provider: Any) -> list[StateComponent] | None:
    method = getattr(provider, "get_state_components", None)
    if not callable(method):
        return None
    components = method()
    return None if components is None else list(components)


def _statefuls(provider: Any, method_name: str) -> dict[str, Any] | None:
    method = getattr(provider, method_name, None)
    if not callable(method):
        return None
    statefuls = method()
    if not isinstance(statefuls, Mapping) or not all(isinstance(k, str) for k in statefuls):
        raise DeclarationTypeError(f"{type(provider).__name__}.{method_name}() must return a dict of "
                                   f"{{str: Stateful}} (got {describe_type(statefuls)})")
    return dict(statefuls)


def _legacy_dicts(provider: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    save = _statefuls(provider, "get_statefuls_for_save")
    if save is None:
        raise DeclarationTypeError(
            f"{type(provider).__name__} is no state provider: it has neither get_state_components() (returning "
            "a list) nor get_statefuls_for_save()")
    load = _statefuls(provider, "get_statefuls_for_load")
    return save, save if load is None else load


def _default_pattern(key: str, stateful: Any) -> SharingPattern:
    return SharingPattern.PER_RANK if key == "rng" or isinstance(stateful, RNGState) else SharingPattern.REPLICATED


def _same_target(saved: Any, loaded: Any) -> bool:
    """Whether loading into ``loaded`` restores what ``saved`` saved: the same object, or two
    ``RNGState``s (stateless views of the process's generators)."""
    return loaded is saved or (isinstance(saved, RNGState) and isinstance(loaded, RNGState))


def components_from_provider(provider: Any, *, patterns: Mapping[str, PatternSpec] | None = None,
                             validate_replication: bool = False) -> list[StateComponent]:
    """The ``StateComponent``s of ``provider`` (see the module docstring for the legacy defaults).

    ``patterns``: ``{key: pattern}`` or ``{key: (SharingPattern.PER_GROUP, group_name)}`` overriding
    the defaults of legacy keys (a DDP trainer whose dataloaders differ per rank says
    ``{"dataset": "per_rank"}``). ``validate_replication``: check REPLICATED legacy components across
    ranks at every ``save_checkpoint(validate=True)``, to catch a key the defaults got wrong.
    """
    components = _new_api_components(provider)
    if components is not None:
        if patterns:
            raise ComponentDeclarationError(
                f"{type(provider).__name__} declares its own components with get_state_components(); "
                f"'patterns' only applies to legacy providers (got patterns for {sorted(patterns)})")
        return components
    save, load = _legacy_dicts(provider)
    patterns = dict(patterns or {})
    unknown = sorted((set(load) | set(patterns)) - set(save))
    if unknown:
        raise ComponentDeclarationError(
            f"{type(provider).__name__}: keys {unknown} are in get_statefuls_for_load() or 'patterns' but not in "
            f"get_statefuls_for_save() ({sorted(save)}): they would never be saved")
    out = []
    for key, stateful in save.items():
        if key in load and not _same_target(stateful, load[key]):
            raise ComponentDeclarationError(
                f"{type(provider).__name__}: get_statefuls_for_load()[{key!r}] is a different object than "
                f"get_statefuls_for_save()[{key!r}] ({describe_type(load[key])} vs {describe_type(stateful)}); "
                "a component saves and loads one object")
        spec = patterns.get(key, _default_pattern(key, stateful))
        pattern, group = spec if isinstance(spec, tuple) else (spec, None)
        pattern = SharingPattern.coerce(pattern)
        out.append(StateComponent(key=key, stateful=stateful, sharing_pattern=pattern, process_group_name=group,
                                  required=key in load,
                                  validate_replication=validate_replication and pattern is SharingPattern.REPLICATED))
    return out


def load_keys(provider: Any) -> list[str] | None:
    """The components a load restores: the keys of a legacy provider's ``get_statefuls_for_load()``
    (None for a provider with ``get_state_components()``: everything declared)."""
    if _new_api_components(provider) is not None:
        return None
    return list(_legacy_dicts(provider)[1])


def process_groups_from_provider(provider: Any) -> dict[str, Any]:
    """``provider.get_process_groups()``, or no groups when it has no such method."""
    method = getattr(provider, "get_process_groups", None)
    groups = method() if callable(method) else None
    if groups is not None and not isinstance(groups, Mapping):
        raise DeclarationTypeError(f"{type(provider).__name__}.get_process_groups() must return a dict "
                                   f"(got {describe_type(groups)})")
    return dict(groups or {})


def coordinator_from_provider(provider: Any, output_dir: str | os.PathLike, *,
                              patterns: Mapping[str, PatternSpec] | None = None,
                              validate_replication: bool = False, **coordinator_options: Any) -> CheckpointCoordinator:
    """A ``CheckpointCoordinator`` over ``provider``'s components and process groups. Collective.

    ``coordinator_options`` go to ``CheckpointCoordinator`` (``storage_options``, ``thread_count`` ...).
    Load with ``coordinator.load_checkpoint(path, components=load_keys(provider))`` to restore what a
    legacy provider's ``get_statefuls_for_load()`` names and nothing else.
    """
    components = components_from_provider(provider, patterns=patterns, validate_replication=validate_replication)
    return CheckpointCoordinator(components, process_groups_from_provider(provider), output_dir=output_dir,
                                 **coordinator_options)
