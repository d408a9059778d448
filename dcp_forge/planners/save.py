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
Planning on every rank by itself (``exchange=RankExchange(group)``, with
``dcp.save(..., use_collectives=False)`` and a ``ForgeStorageWriter`` given the same exchange): DCP
then calls ``create_global_plan`` on every rank with that rank's plan alone. Each rank computes its
own final plan from the declarations (derived.py); one all-reduce of a few numbers proves that the
ranks sharing state agree on it and shares any rank's failure, and the writer's finish gathers what
the coordinator commits. Where the ranks disagree, or some item's holders cannot be named locally,
the plans are gathered and placed on the coordinator as DCP would (``planned_by == "gather"``).
With ``plan_cache`` (one per coordinator), a save whose structure is unchanged reuses its plans.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    create_default_global_save_plan,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from ..core.agreement import LANES, all_agree, member_terms
from ..core.components import ComponentLayout, LayoutSpec, layouts_from
from ..core.key_paths import KeyPath, describe_path, empty_mappings, storable_key, typed_paths
from ..core.keys import parse_storage_key, top_level_key
from ..core.patterns import SharingPattern
from ..core.placement import ChunkPolicy, assign_writers, item_bytes, split_large_tensors
from ..core.tensors import exact_storage, is_plain_tensor, math_bits, narrow_box
from ..core.topology import Topology
from ..errors import IncompleteSaveError, UnsupportedValueError
from ..format.values import SavedForm, has_opaque_layout, pickled_value, refuse_unstorable_tensor
from ..rank_exchange import RankExchange, travelling
from .derived import (
    CommitReport,
    HolderSets,
    Members,
    PlanSummary,
    merged_paths,
    set_name,
    summarize,
    verified_global_plan,
)
from .keymap import default_topology, holders_count, storage_keys_for
from .plan_cache import CachedCommit, CachedPlan, PlanCache, state_signature

# The all-reduce that starts a save planned on every rank: COUNT_LANES counts every rank adds to
# (ranks that failed, that hold items they cannot place alone, that can reuse their cached plan),
# COORDINATOR_LANES only the coordinator adds to (the bytes of the GLOBAL values it alone writes,
# which the placement of shared items balances against), then agreement sums (core.agreement: 0
# modulo their primes when the ranks agree).
COUNT_LANES, COORDINATOR_LANES = 3, 1
_FAILED, _UNPLACEABLE, _CACHED, _GLOBAL_BYTES = range(COUNT_LANES + COORDINATOR_LANES)
_AGREEMENT = COUNT_LANES + COORDINATOR_LANES
_SETS = slice(_AGREEMENT, _AGREEMENT + LANES)  # every replica set's members hold the same items
_GENERATION = slice(_AGREEMENT + LANES, _AGREEMENT + 2 * LANES)  # every rank's cache comes from the same save



class ForgeSavePlanner(DefaultSavePlanner):
    """Save planner applying dcp_forge keys and placement.

    ``components``: StateComponents, or ``{key: pattern}`` / ``{key: (pattern, group)}``. Keys not
    declared are treated as REPLICATED across the world, which is what plain DCP assumes.
    ``topology``: required for PER_NODE / PER_GROUP declarations (see ``gather_topology``).
    ``planning_only``: the state is only planned, never written (tests and benchmarks plan meta
    tensors, which a real save refuses). ``exchange``, ``plan_cache``: planning on every rank by
    itself (module docstring).
    """

    def __init__(self, components: LayoutSpec | None = None, topology: Topology | None = None, *,
                 chunk_policy: ChunkPolicy = ChunkPolicy(), planning_only: bool = False,
                 exchange: RankExchange | None = None, plan_cache: PlanCache | None = None) -> None:
        # DCP's plan caching stays off: it caches plans at class level, a known source of stale
        # plans. ``plan_cache`` (planning on every rank only) is this planner's own, per coordinator.
        # DCP's flattening of nested ShardedTensors walks the whole state once more, and changes
        # ShardedTensor values alone: set_up_planner asks for it only when the state holds one.
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=False, enable_plan_caching=False)
        self.layouts: dict[str, ComponentLayout] = layouts_from(components)
        self._topology = topology
        self._topology_given = topology is not None
        self.chunk_policy = chunk_policy
        self.planning_only = planning_only
        self.key_map: dict[str, str] = {}
        self._layout_of_storage_key: dict[str, ComponentLayout | None] = {}
        self._key_paths: dict[str, KeyPath] = {}
        self._empty_mappings: set[str] = set()  # the fqns of empty dictionaries stored as values
        self._opaque: set[str] = set()  # the fqns of plain tensors stored whole, pickled (values.py)
        # fqn -> what the writer records beside DCP's metadata (only values that have something)
        self.saved_forms: dict[str, SavedForm] = {}
        # fqn -> the pickle proven to load back at planning, written as it is (resolve_data)
        self._pickled: dict[str, io.BytesIO] = {}
        self.exchange = exchange
        self.plan_cache = plan_cache
        self._holders: dict[str, int] = {}
        # How the last global plan was made: "gather" (every rank's plan on the coordinator),
        # "declarations" (on every rank by itself), "cache" (every rank reused its last plan).
        self.planned_by: str | None = None
        self._error: Exception | None = None  # planning on every rank: shared before anyone writes
        self._summary: PlanSummary | str | None = None
        self._signature: bytes | None = None
        self._cached: CachedPlan | None = None
        self._final: SavePlan | None = None
        self._coordinator_bytes = 0
        self._default_lookup = (type(self).lookup_object is DefaultSavePlanner.lookup_object
                                and type(self).transform_object is DefaultSavePlanner.transform_object)

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = default_topology(self.layouts)
        return self._topology

    def set_up_planner(self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None,
                       is_coordinator: bool = False) -> None:
        self._error = None
        try:
            self._set_up(state_dict, storage_meta, is_coordinator)
        except Exception as err:
            if self.exchange is None:
                raise
            self._error = err  # raised on every rank by create_global_plan's agreement

    def _set_up(self, state_dict: dict[str, Any], storage_meta: StorageMeta | None, is_coordinator: bool) -> None:
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
            if any(type(value) is not torch.Tensor and hasattr(value, "local_shards")
                   for value in self.state_dict.values()):
                self.state_dict = _sharded_tensors_flattened(self.state_dict)
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
        self._empty_mappings = set()
        for path, steps, empty in empty_mappings(state_dict):
            fqn = ".".join(map(str, path))
            if fqn in self.state_dict:  # {1: {}, "1": 5}: two keys with one string form
                raise UnsupportedValueError(
                    f"{self._where(fqn)}: two keys of one dictionary have the same string form, so their values "
                    "would share one stored name; make the keys distinct as strings")
            self.state_dict[fqn] = _EmptyMapping(empty)
            self._empty_mappings.add(fqn)
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
        key = top_level_key(fqn)
        count = self._holders.get(key)
        if count is None:
            count = self._holders[key] = holders_count(self._layout_of_storage_key.get(key), self.topology)
        return count

    def _owned_here(self, item: WriteItem) -> bool:
        """GLOBAL plain values are rank 0's; other ranks' copies are not planned at all."""
        return self._owns(item.index.fqn) or item.type == WriteItemType.SHARD  # DTensor shards: DCP's handling

    def _owns(self, fqn: str) -> bool:
        """Whether this rank plans the plain value ``fqn`` (GLOBAL values: rank 0 only)."""
        if self.topology.rank == 0:
            return True
        layout = self._layout_of_storage_key.get(top_level_key(fqn))
        return layout is None or layout.pattern is not SharingPattern.GLOBAL

    def _check_tensors(self) -> None:
        """Refuse the plain tensors this rank plans whose values cannot be stored (before DCP's
        planning, which would fail on some), and note the opaque ones (``_opaque``)."""
        self._opaque = set()
        owns_all = self.topology.rank == 0  # asked once, not per tensor (see _owns)
        for fqn, value in self.state_dict.items():
            if type(value) is not torch.Tensor and not is_plain_tensor(value):
                continue
            if has_opaque_layout(value):
                self._opaque.add(fqn)
            if owns_all or self._owns(fqn):
                refuse_unstorable_tensor(value, self._where, fqn, allow_meta=self.planning_only)

    def _local_plan(self) -> SavePlan:
        # DCP's default local plan, except that opaque tensors (quantized, sparse, nested) are stored
        # whole as pickles: their quantizer or indices are not bytes of one strided storage.
        opaque = self._opaque
        plain = {k: v for k, v in self.state_dict.items() if k not in opaque} if opaque else self.state_dict
        plan = create_default_local_save_plan(plain, self.is_coordinator)
        items = [*plan.items, *(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO) for fqn in sorted(opaque))]
        kept = items if self.topology.rank == 0 else [it for it in items if self._owned_here(it)]
        empties = tuple(sorted(it.index.fqn for it in kept if it.index.fqn in self._empty_mappings))
        plan = dataclasses.replace(plan, items=kept, planner_data={**self.mappings, _EMPTY_MAPPINGS: empties}
                                   if empties else self.mappings)
        self._check_values(plan)
        return split_large_tensors(plan, self._holders_of, self.chunk_policy)

    def create_local_plan(self) -> SavePlan:
        if self.exchange is None:
            self._check_tensors()
            self.plan = self._local_plan()
            return self.plan
        self._summary = self._cached = self._signature = self._final = None
        if self._error is None:
            try:
                self._plan_locally()
            except Exception as err:  # raised on every rank by create_global_plan's agreement
                self._error = err
        if self._error is not None:
            self.plan = SavePlan([])
        return self.plan

    def _plan_locally(self) -> None:
        """This rank's local plan and who holds each of its items, reused from the cache when the
        state's structure is unchanged since the last committed save."""
        self._check_tensors()
        if self.plan_cache is not None:
            self._signature = state_signature(self.state_dict, self.mappings, self._signature_context(), self._opaque)
            self._cached = self.plan_cache.lookup(self._signature)
        if self._cached is not None:  # the values are new: pickled and their forms noted afresh
            self.plan, self._summary = self._cached.local_plan, self._cached.summary
            self._check_values(self.plan)
            return
        self.plan = self._local_plan()
        self._summary = self.summarize_holders(self.plan)

    def summarize_holders(self, local_plan: SavePlan) -> PlanSummary | str:
        """Who holds each item of this rank's ``local_plan`` (derived.summarize), or why some item's
        holders cannot be named by this rank alone. Needs ``set_up_planner`` first."""
        holder_sets = HolderSets(self.topology)
        of_whole_values: dict[str, tuple[bytes, Members] | None] = {}  # storage key -> the holders of its whole values

        def holders(item: WriteItem) -> tuple[bytes, Members] | None:
            fqn = item.index.fqn
            key = top_level_key(fqn)
            if item.type is not WriteItemType.SHARD:  # a whole value: its holders are its storage key's
                if key not in of_whole_values:
                    of_whole_values[key] = holder_sets.of(item, None, self._layout_of_storage_key.get(key))
                return of_whole_values[key]
            return holder_sets.of(item, self.state_dict.get(fqn), self._layout_of_storage_key.get(key))

        return summarize(local_plan, holders, self.topology.rank, self.topology.world_size)

    def _check_values(self, plan: SavePlan) -> None:
        """Refuse what would not come back exactly (before anything is written), keep each proven
        pickle for writing, and note each value's saved form."""
        self._pickled, self.saved_forms = {}, {}
        state, opaque_fqns, key_paths = self.state_dict, self._opaque, self._key_paths
        for item in plan.items:
            fqn = item.index.fqn
            value = state.get(fqn)
            opaque = fqn in opaque_fqns
            if item.type is WriteItemType.BYTE_IO and not opaque:
                original = value.mapping if isinstance(value, _EmptyMapping) else value
                self._pickled[fqn] = pickled_value(original, self._where(fqn))
            key_path = key_paths.get(fqn)
            bits = math_bits(value) if not opaque and is_plain_tensor(value) else None
            if key_path is not None or bits is not None:  # a SavedForm holding neither is not kept
                self.saved_forms[fqn] = SavedForm(key_path[1:] if key_path is not None else None, bits)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        kept = {item.index.fqn for item in new_plan.items if item.type == WriteItemType.BYTE_IO}
        self._pickled = {fqn: data for fqn, data in self._pickled.items() if fqn in kept}  # others: another rank's
        return super().finish_plan(new_plan)

    @property
    def summary(self) -> PlanSummary | str | None:
        """Who holds each item of this rank's last local plan (planning on every rank), or why some
        item's holders could not be named by this rank alone."""
        return self._summary

    @property
    def placement_base(self) -> dict[int, int]:
        """The loads the last derived placement started from, the same on every rank: the
        coordinator's GLOBAL values (``global_value_bytes`` of rank 0)."""
        return {0: self._coordinator_bytes} if self._coordinator_bytes else {}

    def _signature_context(self) -> bytes:
        """What a plan depends on besides the state's structure (see plan_cache.state_signature)."""
        assert self.plan_cache is not None
        return repr((type(self).__qualname__, self.topology.rank, self.plan_cache.topology_digest(self.topology),
                     sorted((k, v.pattern.value, v.group_name) for k, v in self.layouts.items()),
                     self.chunk_policy)).encode()

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        if self.exchange is not None and len(all_plans) == 1:
            return self._plan_on_every_rank(all_plans[0])
        if self._topology_given and len(all_plans) != self.topology.world_size:
            # DCP saves as a single process when torch.distributed's default group is gone by the time
            # a (background) save starts: this rank's shards alone would pass for the whole state.
            raise IncompleteSaveError(
                f"the save was planned by {len(all_plans)} rank(s), but the topology has "
                f"{self.topology.world_size} (rank {self.topology.rank}); was the process group destroyed "
                "while the save was starting? Nothing was written")
        global_plan, metadata = self._gathered_global_plan(all_plans)
        self.planned_by = "gather"
        return global_plan, metadata

    def _gathered_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """Every rank's final plan and the metadata, from every rank's local plan (coordinator)."""
        placed = assign_writers(drop_shadowed_empty_mappings(all_plans))
        global_plan, metadata = create_default_global_save_plan(placed)
        if self.flatten_state_dict:
            metadata = dataclasses.replace(metadata, planner_data=merged_paths(global_plan))
        self.global_plan = global_plan
        self.metadata = metadata
        return global_plan, metadata

    # --- planning on every rank by itself (use_collectives=False) -------------------------------
    def _plan_on_every_rank(self, local_plan: SavePlan) -> tuple[list[SavePlan], Metadata]:
        exchange = self.exchange
        assert exchange is not None
        if (exchange.rank, exchange.world_size) != (self.topology.rank, self.topology.world_size):
            raise IncompleteSaveError(
                f"the save's process group has rank {exchange.rank} of {exchange.world_size}, its topology rank "
                f"{self.topology.rank} of {self.topology.world_size}: plan over the group the topology was "
                "gathered on. Nothing was written")
        error = self._error or exchange.failure
        summed = exchange.sum(self._agreement_lanes(exchange, error))
        if summed[_FAILED]:
            exchange.raise_everywhere("planning the save", error)
        if summed[_UNPLACEABLE] == 0 and all_agree(summed[_SETS]):
            every_rank_cached = summed[_CACHED] == exchange.world_size and all_agree(summed[_GENERATION])
            self.planned_by = "cache" if every_rank_cached else "declarations"
            if every_rank_cached and self.plan_cache is not None:
                self.plan_cache.hits += 1
            final = self._derive(local_plan, summed[_GLOBAL_BYTES])
        else:
            final = self._gather_and_scatter(local_plan)
        self._final = final
        return [final], Metadata(state_dict_metadata={})

    def _derive(self, local_plan: SavePlan, coordinator_bytes: int) -> SavePlan:
        """This rank's final plan, once the ranks agree (reused from the cache when made from the same
        structure and the same coordinator load). A failure here leaves nothing to write and is raised
        on every rank at the commit (``commit_report``): no rank may stop while the others write."""
        assert isinstance(self._summary, PlanSummary)
        self._coordinator_bytes = coordinator_bytes
        if self._cached is not None and self._cached.coordinator_bytes == coordinator_bytes:
            return self._cached.final_plan
        try:
            return self._summary.final_plan(local_plan, self.placement_base)
        except Exception as err:
            self._error = err
            return dataclasses.replace(local_plan, items=[])

    def _agreement_lanes(self, exchange: RankExchange, error: BaseException | None) -> list[int]:
        lanes = [0] * (_AGREEMENT + 2 * LANES)
        lanes[_FAILED] = int(error is not None)
        if error is not None:
            return lanes
        if isinstance(self._summary, PlanSummary):
            lanes[_SETS] = self._summary.agreement_terms()
        else:
            lanes[_UNPLACEABLE] = 1
        if self.topology.rank == 0:
            lanes[_GLOBAL_BYTES] = self.global_value_bytes()
        cache = self.plan_cache  # where self._cached came from
        generation = cache.generation if cache is not None else None
        reusable = self._cached is not None and cache is not None and (
            not exchange.is_coordinator or cache.commit_for(generation) is not None)
        lanes[_CACHED] = int(reusable)
        world = self.topology.world_size
        lanes[_GENERATION] = member_terms(b"generation " + set_name(range(world)), self.topology.rank, world,
                                          (generation or "").encode() if reusable else b"")
        return lanes

    def global_value_bytes(self) -> int:
        """Bytes of the GLOBAL plain values in this rank's local plan (rank 0 alone plans them; DTensor
        shards follow their mesh): what the coordinator writes besides its share of shared state."""
        global_keys = {key for key, layout in self._layout_of_storage_key.items()
                       if layout is not None and layout.pattern is SharingPattern.GLOBAL}
        if not global_keys:  # nothing declared GLOBAL: no item to look at
            return 0
        return sum(item_bytes(item) for item in self.plan.items
                   if item.type != WriteItemType.SHARD and top_level_key(item.index.fqn) in global_keys)

    def _gather_and_scatter(self, local_plan: SavePlan) -> SavePlan:
        """DCP's path: every rank's local plan on the coordinator, which places them and sends each
        rank its final plan; a failure there raises on every rank."""
        exchange = self.exchange
        assert exchange is not None
        self.planned_by = "gather"
        plans = exchange.gather(local_plan)
        failures, finals = None, None
        if plans is not None:
            try:
                finals, _ = self._gathered_global_plan(plans)
            except Exception as err:  # e.g. holders disagreeing on a shape: every rank raises it
                failures = {exchange.rank: travelling(err, exchange.rank)}
        return exchange.scatter_outcome("planning the save", failures, finals)

    def commit_report(self) -> CommitReport | None:
        """What the coordinator needs from this rank to commit (writer's finish, every rank); raises a
        failure of this rank's planning left for the commit to share."""
        if self._error is not None:
            raise self._error
        if self.planned_by == "declarations" and isinstance(self._summary, PlanSummary) and self._final is not None:
            # One process: the exchange hands the coordinator this report itself, to check against
            # this summary (global_plan_and_metadata).
            in_process = self.exchange is not None and self.exchange.hands_objects_over
            return self._summary.commit_report(self._final, in_process)
        return None

    def global_plan_and_metadata(self, reports: Sequence[CommitReport | None], where: str
                                 ) -> tuple[list[SavePlan], Metadata]:
        """Every rank's final plan and the metadata to commit, from every rank's ``commit_report``
        (writer's finish, coordinator)."""
        if self.planned_by == "cache":
            cached = self.plan_cache.commit_for(self.plan_cache.generation) if self.plan_cache else None
            if cached is None:
                raise IncompleteSaveError(f"not committing checkpoint {where}: the cached plan to reuse is gone")
            self.global_plan = cached.global_plan
            self.metadata = Metadata(state_dict_metadata=cached.metadata.state_dict_metadata,
                                     planner_data=cached.metadata.planner_data)
        elif self.planned_by == "declarations":
            sent = [report for report in reports if report is not None]
            if len(sent) != len(reports):
                raise IncompleteSaveError(f"not committing checkpoint {where}: rank(s) "
                                          f"{[r for r, rep in enumerate(reports) if rep is None]} sent no plan")
            digested = self._summary.sets if isinstance(self._summary, PlanSummary) else ()
            self.global_plan, self.metadata = verified_global_plan(sent, self.topology.world_size, where, digested)
        return self.global_plan, self.metadata

    def committed(self, generation: str) -> None:
        """Keep this save's plans for the next save (writer's finish, every rank, once committed)."""
        if self.plan_cache is None or self.planned_by not in ("cache", "declarations") or self._signature is None:
            return
        assert isinstance(self._summary, PlanSummary) and self._final is not None
        skeleton = None
        if self.exchange is not None and self.exchange.is_coordinator:
            skeleton = CachedCommit(generation, list(self.global_plan), Metadata(
                state_dict_metadata=self.metadata.state_dict_metadata, planner_data=self.metadata.planner_data))
        self.plan_cache.remember(CachedPlan(self._signature, self.plan, self._summary, self._final,
                                            self._coordinator_bytes, generation), skeleton)

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | Any:
        kind = write_item.type
        if kind is WriteItemType.TENSOR:
            obj = self.state_dict.get(write_item.index.fqn)
            # What DCP's lookup returns for a plain tensor at its origin, without its per-item
            # lookups (unless a subclass changed how objects are looked up or transformed).
            if type(obj) is torch.Tensor and self._default_lookup:
                offset = write_item.index.offset
                if offset is None or (not any(offset) and len(offset) == obj.dim()):
                    return exact_storage(obj)
        elif kind is WriteItemType.BYTE_IO:
            pickled = self._pickled.pop(write_item.index.fqn, None)
            if pickled is not None:
                return pickled
        elif kind is WriteItemType.SHARD:
            obj = self.state_dict.get(write_item.index.fqn)
            if is_plain_tensor(obj):  # one of our row-chunks of a plain tensor
                assert write_item.tensor_data is not None, "a SHARD item describes its chunk"
                chunk = write_item.tensor_data.chunk
                return exact_storage(narrow_box(obj, chunk.offsets, chunk.sizes))
        data = super().resolve_data(write_item)
        return exact_storage(data) if isinstance(data, torch.Tensor) else data


def _sharded_tensors_flattened(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with its nested ShardedTensors flattened, as ``DefaultSavePlanner`` does."""
    flattener = DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=True)
    flattener.set_up_planner(state_dict)
    return flattener.state_dict


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
