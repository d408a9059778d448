"""ForgeSavePlanner: DCP's default save planner plus sharing-pattern keys and balanced placement.

Call protocol (DCP's, unchanged): on every rank ``set_up_planner`` then ``create_local_plan``; on
the coordinator ``create_global_plan`` over every rank's local plan; on every rank ``finish_plan``
then ``resolve_data`` once per write item (possibly from several writer threads at once).

What it adds over ``DefaultSavePlanner``:

- top-level keys are renamed to storage keys (keys.py), so per-rank/node/group copies never merge;
- GLOBAL plain values are planned on rank 0 only (their owner); DTensor shards keep DCP's handling;
- big plain tensors become row-chunks (placement.split_large_tensors) and every unique item gets
  exactly one writer, balanced by bytes over the ranks that hold it (placement.assign_writers);
- values come back exactly or are refused here, before anything is written (values.py): quantized,
  sparse and nested tensors are stored whole as pickles, every other pickled value is proven to load
  back weights-only, meta tensors and keys that cannot be recorded raise ``UnsupportedValueError``;
  ``saved_forms`` holds what the writer records beside DCP's metadata (real key types, view flags).

It works as ``dcp.save(state_dict, planner=ForgeSavePlanner(...), ...)`` with any storage writer.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections import ChainMap
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    create_default_global_save_plan,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from ..core.components import ComponentLayout, LayoutSpec, layouts_from
from ..core.key_paths import KeyPath, describe_path, empty_mappings, storable_key, typed_paths
from ..core.keys import parse_storage_key, top_level_key
from ..core.patterns import SharingPattern
from ..core.placement import ChunkPolicy, assign_writers, split_large_tensors
from ..core.tensors import exact_storage, is_plain_tensor, math_bits, narrow_box
from ..core.topology import Topology
from ..errors import IncompleteSaveError, UnsupportedValueError
from ..format.values import SavedForm, is_opaque_tensor, pickled_value, refuse_unstorable_tensor
from .keymap import default_topology, holders_count, storage_keys_for


class ForgeSavePlanner(DefaultSavePlanner):
    """Save planner applying dcp_forge keys and placement.

    ``components``: StateComponents, or ``{key: pattern}`` / ``{key: (pattern, group)}``. Keys not
    declared are treated as REPLICATED across the world, which is what plain DCP assumes.
    ``topology``: required for PER_NODE / PER_GROUP declarations (see ``gather_topology``).
    ``planning_only``: the state is only planned, never written (tests and benchmarks plan meta
    tensors, which a real save refuses).
    """

    def __init__(self, components: LayoutSpec | None = None, topology: Topology | None = None, *,
                 chunk_policy: ChunkPolicy = ChunkPolicy(), planning_only: bool = False) -> None:
        # Plan caching stays off: DCP caches plans at class level, a known source of stale plans.
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True, enable_plan_caching=False)
        self.layouts: dict[str, ComponentLayout] = layouts_from(components)
        self._topology = topology
        self._topology_given = topology is not None
        self.chunk_policy = chunk_policy
        self.planning_only = planning_only
        self.key_map: dict[str, str] = {}
        self._layout_of_storage_key: dict[str, ComponentLayout | None] = {}
        self._key_paths: dict[str, KeyPath] = {}
        # fqn -> what the writer records beside DCP's metadata (only values that have something)
        self.saved_forms: dict[str, SavedForm] = {}
        # fqn -> the pickle proven to load back at planning, written as it is (resolve_data)
        self._pickled: dict[str, io.BytesIO] = {}

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = default_topology(self.layouts)
        return self._topology

    def set_up_planner(self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None,
                       is_coordinator: bool = False) -> None:
        odd = [k for k in state_dict if type(k) is not str]
        if odd:
            raise UnsupportedValueError(
                f"rank {self.topology.rank}: top-level state-dict keys must be strings (component keys); "
                f"got {odd[0]!r} of type <{type(odd[0]).__name__}>")
        self.key_map = storage_keys_for(state_dict.keys(), self.layouts, self.topology)
        self._layout_of_storage_key = {sk: self.layouts.get(k) for k, sk in self.key_map.items()}
        renamed = {self.key_map[k]: v for k, v in state_dict.items()}
        try:
            super().set_up_planner(renamed, storage_meta, is_coordinator)
        except ValueError as err:  # DCP's flattening: two keys with the same str() ({1: a, "1": b})
            if "duplicated flatten key" not in str(err):
                raise
            raise UnsupportedValueError(
                f"{self._where(str(err).rsplit(' ', 1)[-1])}: two keys of one dictionary have the same string "
                "form, so their values would share one stored name; make the keys distinct as strings") from err
        self._key_paths = typed_paths(renamed, self.mappings)
        self._add_empty_mappings(renamed)
        self._refuse_unstorable_keys()

    def _refuse_unstorable_keys(self) -> None:
        for fqn, path in self._key_paths.items():
            bad = next((step.key for step in path if not step.index and not storable_key(step.key)), None)
            if bad is not None:
                raise UnsupportedValueError(
                    f"{self._where(fqn)}: the key {bad!r} on its path {describe_path(path[1:])!r} is a "
                    f"<{type(bad).__name__}>; keys are stored as str, int, bool, float, None, bytes or tuples of "
                    "these (anything else could not be rebuilt without running code). Use one of those, or "
                    "key an optimizer's state by parameter name with dcp_forge.OptimizerState")

    def _add_empty_mappings(self, state_dict: dict[str, Any]) -> None:
        """Store each empty dictionary as a value of its own: DCP's flattening keeps leaves only."""
        for path, steps, empty in empty_mappings(state_dict):
            fqn = ".".join(map(str, path))
            if fqn in self.state_dict:  # {1: {}, "1": 5}: two keys with one string form
                raise UnsupportedValueError(
                    f"{self._where(fqn)}: two keys of one dictionary have the same string form, so their values "
                    "would share one stored name; make the keys distinct as strings")
            self.state_dict[fqn] = _EmptyMapping(empty)
            self.mappings[fqn] = path
            if any(type(step.key) is not str for step in steps if not step.index):
                self._key_paths[fqn] = steps

    def _where(self, fqn: str) -> str:
        """``component 'optimizer' on rank 1, key 'state.0.exp_avg'`` for messages."""
        skey = top_level_key(fqn)
        try:
            component = parse_storage_key(skey).component
        except ValueError:
            component = skey
        relative = fqn[len(skey) + 1:]
        return f"component {component!r} on rank {self.topology.rank}" + (f", key {relative!r}" if relative else "")

    def _holders_of(self, fqn: str) -> int:
        return holders_count(self._layout_of_storage_key.get(top_level_key(fqn)), self.topology)

    def _owned_here(self, item: WriteItem) -> bool:
        """GLOBAL plain values are rank 0's; other ranks' copies are not planned at all."""
        return self._owns(item.index.fqn) or item.type == WriteItemType.SHARD  # DTensor shards: DCP's handling

    def _owns(self, fqn: str) -> bool:
        """Whether this rank plans the plain value ``fqn`` (GLOBAL values: rank 0 only)."""
        layout = self._layout_of_storage_key.get(top_level_key(fqn))
        return layout is None or layout.pattern is not SharingPattern.GLOBAL or self.topology.rank == 0

    def create_local_plan(self) -> SavePlan:
        for fqn, value in self.state_dict.items():  # before DCP's planning, which would fail on some
            if is_plain_tensor(value) and self._owns(fqn):
                refuse_unstorable_tensor(value, functools.partial(self._where, fqn), allow_meta=self.planning_only)
        # DCP's default local plan, except that opaque tensors (quantized, sparse, nested) are stored
        # whole as pickles: their quantizer or indices are not bytes of one strided storage.
        opaque = {fqn for fqn, value in self.state_dict.items() if is_opaque_tensor(value)}
        plain = {k: v for k, v in self.state_dict.items() if k not in opaque} if opaque else self.state_dict
        plan = create_default_local_save_plan(plain, self.is_coordinator)
        items = [*plan.items, *(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO) for fqn in sorted(opaque))]
        kept = [it for it in items if self._owned_here(it)]
        empties = tuple(sorted(it.index.fqn for it in kept if isinstance(self.state_dict.get(it.index.fqn), _EmptyMapping)))
        plan = dataclasses.replace(plan, items=kept, planner_data={**self.mappings, _EMPTY_MAPPINGS: empties}
                                   if empties else self.mappings)
        self._check_values(plan)
        self.plan = split_large_tensors(plan, self._holders_of, self.chunk_policy)
        return self.plan

    def _check_values(self, plan: SavePlan) -> None:
        """Refuse what would not come back exactly (before anything is written), keep each proven
        pickle for writing, and note each value's saved form."""
        self._pickled, self.saved_forms = {}, {}
        for item in plan.items:
            fqn = item.index.fqn
            value = self.state_dict.get(fqn)
            if item.type == WriteItemType.BYTE_IO and not is_opaque_tensor(value):
                original = value.mapping if isinstance(value, _EmptyMapping) else value
                self._pickled[fqn] = pickled_value(original, self._where(fqn))
            key_path = self._key_paths.get(fqn)
            form = SavedForm(key_path[1:] if key_path is not None else None,
                             math_bits(value) if is_plain_tensor(value) and not is_opaque_tensor(value) else None)
            if form:
                self.saved_forms[fqn] = form

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        kept = {item.index.fqn for item in new_plan.items if item.type == WriteItemType.BYTE_IO}
        self._pickled = {fqn: data for fqn, data in self._pickled.items() if fqn in kept}  # others: another rank's
        return super().finish_plan(new_plan)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        if self._topology_given and len(all_plans) != self.topology.world_size:
            # DCP saves as a single process when torch.distributed's default group is gone by the time
            # a (background) save starts: this rank's shards alone would pass for the whole state.
            raise IncompleteSaveError(
                f"the save was planned by {len(all_plans)} rank(s), but the topology has "
                f"{self.topology.world_size} (rank {self.topology.rank}); was the process group destroyed "
                "while the save was starting? Nothing was written")
        placed = assign_writers(drop_shadowed_empty_mappings(all_plans))
        global_plan, metadata = create_default_global_save_plan(placed)
        if self.flatten_state_dict:
            merged = dict(ChainMap(*[p.planner_data for p in global_plan if p.planner_data]))
            metadata = dataclasses.replace(metadata, planner_data=merged)
        self.global_plan = global_plan
        self.metadata = metadata
        return global_plan, metadata

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | Any:
        if write_item.type == WriteItemType.BYTE_IO:
            pickled = self._pickled.pop(write_item.index.fqn, None)
            if pickled is not None:
                return pickled
        if write_item.type == WriteItemType.SHARD:
            obj = self.state_dict.get(write_item.index.fqn)
            if is_plain_tensor(obj):  # one of our row-chunks of a plain tensor
                chunk = write_item.tensor_data.chunk
                return exact_storage(narrow_box(obj, chunk.offsets, chunk.sizes))
        data = super().resolve_data(write_item)
        return exact_storage(data) if isinstance(data, torch.Tensor) else data


# The key of a local plan's planner_data under which it lists its empty-dictionary items (no fqn is "").
_EMPTY_MAPPINGS = ""


def drop_shadowed_empty_mappings(plans: list[SavePlan]) -> list[SavePlan]:
    """Plans without the empty dictionaries that another holder fills, and without their marker.

    Ranks sharing a storage key may hold a dictionary that is empty on some of them and filled on
    others (a data loader whose state lives on one rank of its group): stored as both, the empty one
    would replace the filled one at load. A filled dictionary is the value; an empty one only stands
    for a dictionary nobody filled.
    """
    filled: set[tuple] = set()
    for plan in plans:
        paths = plan.planner_data or {}
        for item in plan.items:
            path = paths.get(item.index.fqn)
            if path is not None:
                filled.update(tuple(path[:i]) for i in range(1, len(path)))
    out = []
    for plan in plans:
        paths = dict(plan.planner_data or {})
        empties = set(paths.pop(_EMPTY_MAPPINGS, ()))
        shadowed = {fqn for fqn in empties if tuple(paths.get(fqn, ())) in filled}
        for fqn in shadowed:
            paths.pop(fqn, None)
        items = [it for it in plan.items if it.index.fqn not in shadowed] if shadowed else plan.items
        out.append(dataclasses.replace(plan, items=items, planner_data=paths if plan.planner_data is not None else None))
    return out


class _EmptyMapping:
    """An empty dictionary as a leaf of the flattened state (pickled as the dictionary itself)."""

    def __init__(self, mapping: Any) -> None:
        self.mapping = mapping
