"""ForgeSavePlanner: DCP's default save planner plus sharing-pattern keys and balanced placement.

Call protocol (DCP's, unchanged): on every rank ``set_up_planner`` then ``create_local_plan``; on
the coordinator ``create_global_plan`` over every rank's local plan; on every rank ``finish_plan``
then ``resolve_data`` once per write item (possibly from several writer threads at once).

What it adds over ``DefaultSavePlanner``:

- top-level keys are renamed to storage keys (keys.py), so per-rank/node/group copies never merge;
- GLOBAL plain values are planned on rank 0 only (their owner); DTensor shards keep DCP's handling;
- big plain tensors become row-chunks (placement.split_large_tensors) and every unique item gets
  exactly one writer, balanced by bytes over the ranks that hold it (placement.assign_writers).

It works as ``dcp.save(state_dict, planner=ForgeSavePlanner(...), ...)`` with any storage writer.
"""

from __future__ import annotations

import dataclasses
from collections import ChainMap
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from ..core.components import ComponentLayout, LayoutSpec, layouts_from
from ..core.keys import top_level_key
from ..core.patterns import SharingPattern
from ..core.placement import ChunkPolicy, assign_writers, split_large_tensors
from ..core.tensors import exact_storage, is_plain_tensor, narrow_box
from ..core.topology import Topology
from ..errors import IncompleteSaveError
from .keymap import default_topology, holders_count, storage_keys_for


class ForgeSavePlanner(DefaultSavePlanner):
    """Save planner applying dcp_forge keys and placement.

    ``components``: StateComponents, or ``{key: pattern}`` / ``{key: (pattern, group)}``. Keys not
    declared are treated as REPLICATED across the world, which is what plain DCP assumes.
    ``topology``: required for PER_NODE / PER_GROUP declarations (see ``gather_topology``).
    """

    def __init__(self, components: LayoutSpec | None = None, topology: Topology | None = None, *,
                 chunk_policy: ChunkPolicy = ChunkPolicy()) -> None:
        # Plan caching stays off: DCP caches plans at class level, a known source of stale plans.
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True, enable_plan_caching=False)
        self.layouts: dict[str, ComponentLayout] = layouts_from(components)
        self._topology = topology
        self._topology_given = topology is not None
        self.chunk_policy = chunk_policy
        self.key_map: dict[str, str] = {}
        self._layout_of_storage_key: dict[str, ComponentLayout | None] = {}

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = default_topology(self.layouts)
        return self._topology

    def set_up_planner(self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None,
                       is_coordinator: bool = False) -> None:
        self.key_map = storage_keys_for(state_dict.keys(), self.layouts, self.topology)
        self._layout_of_storage_key = {sk: self.layouts.get(k) for k, sk in self.key_map.items()}
        renamed = {self.key_map[k]: v for k, v in state_dict.items()}
        super().set_up_planner(renamed, storage_meta, is_coordinator)

    def _holders_of(self, fqn: str) -> int:
        return holders_count(self._layout_of_storage_key.get(top_level_key(fqn)), self.topology)

    def _owned_here(self, item: WriteItem) -> bool:
        """GLOBAL plain values are rank 0's; other ranks' copies are not planned at all."""
        layout = self._layout_of_storage_key.get(top_level_key(item.index.fqn))
        if layout is None or layout.pattern is not SharingPattern.GLOBAL or self.topology.rank == 0:
            return True
        return item.type == WriteItemType.SHARD  # DTensor / ShardedTensor shards keep DCP's handling

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        plan = dataclasses.replace(plan, items=[it for it in plan.items if self._owned_here(it)])
        self.plan = split_large_tensors(plan, self._holders_of, self.chunk_policy)
        return self.plan

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        if self._topology_given and len(all_plans) != self.topology.world_size:
            # DCP saves as a single process when torch.distributed's default group is gone by the time
            # a (background) save starts: this rank's shards alone would pass for the whole state.
            raise IncompleteSaveError(
                f"the save was planned by {len(all_plans)} rank(s), but the topology has "
                f"{self.topology.world_size} (rank {self.topology.rank}); was the process group destroyed "
                "while the save was starting? Nothing was written")
        placed = assign_writers(all_plans)
        global_plan, metadata = create_default_global_save_plan(placed)
        if self.flatten_state_dict:
            merged = dict(ChainMap(*[p.planner_data for p in global_plan if p.planner_data]))
            metadata = dataclasses.replace(metadata, planner_data=merged)
        self.global_plan = global_plan
        self.metadata = metadata
        return global_plan, metadata

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | Any:
        if write_item.type == WriteItemType.SHARD:
            obj = self.state_dict.get(write_item.index.fqn)
            if is_plain_tensor(obj):  # one of our row-chunks of a plain tensor
                chunk = write_item.tensor_data.chunk
                return exact_storage(narrow_box(obj, chunk.offsets, chunk.sizes))
        data = super().resolve_data(write_item)
        return exact_storage(data) if isinstance(data, torch.Tensor) else data
