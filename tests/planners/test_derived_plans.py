"""Saves planned on every rank by itself (planners/derived.py), simulated in one process over random
topologies, patterns and DTensor layouts: the ranks agree exactly when they hold the same shared
state, the plans they derive alone keep the coordinator's guarantees (every unique item written
once, by a holder, balanced per replica set), and the coordinator's metadata is the same."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from dcp_forge.core.agreement import all_agree
from dcp_forge.core.components import ComponentLayout
from dcp_forge.core.keys import top_level_key
from dcp_forge.core.patterns import SharingPattern
from dcp_forge.core.placement import (
    ChunkPolicy,
    assign_writers,
    describe_item,
    index_order,
    item_bytes,
    plan_loads,
)
from dcp_forge.core.topology import Topology
from dcp_forge.errors import IncompleteSaveError
from dcp_forge.planners.derived import PlanSummary, item_key, items_digest, summarize, verified_global_plan
from tests.support.strategies import (
    RESHARD_LAYOUTS,
    commit_reports,
    derived_plans,
    jobs,
    reshard_cases,
    save_plans,
)

SETTINGS = settings(max_examples=120, deadline=None)


def _holders(plans):
    out = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            out.setdefault(item_key(item), []).append(rank)
    return out


def _job_plans(job):
    return derived_plans([dict(job.states)] * job.topology.world_size, job.layouts, job.topology, job.policy)


def _case_plans(case):
    states = [case.state(rank, loading=False) for rank in range(case.saved.world_size)]
    return derived_plans(states, RESHARD_LAYOUTS, case.saved, case.policy)


def _check_written_once_by_a_holder(derived):
    assert all(isinstance(s, PlanSummary) for s in derived.summaries), derived.summaries
    assert all_agree(derived.summed)
    holders = _holders(derived.local)
    written = {}
    for rank, plan in enumerate(derived.finals):
        for item in plan.items:
            assert item_key(item) not in written, f"{item.index} written twice"
            assert rank in holders[item_key(item)]
            written[item_key(item)] = rank
    assert set(written) == set(holders)


def _check_balanced_per_set(derived):
    """Every member of a replica set got its last item of the set while it was the least loaded one
    (counting what the world set gave it first): the bound behind max <= mean + largest chunk."""
    summary = derived.summaries[0]
    world = summary.world_size
    loads_from = {}  # set name -> rank -> bytes written of it
    last = {}  # (set name, rank) -> smallest item it got
    sets = {}
    for rank, (s, plan) in enumerate(zip(derived.summaries, derived.finals, strict=True)):
        for item in plan.items:
            share = s.sets[s.set_of_item[item_key(item)]]
            if share.size == 1:
                continue
            sets[share.name] = share.members
            loads_from.setdefault(share.name, {}).setdefault(rank, 0)
            loads_from[share.name][rank] += item_bytes(item)
            key = (share.name, rank)
            last[key] = min(last.get(key, (1 << 62,)), (item_bytes(item),))
    world_name = next((name for name, members in sets.items() if len(members) == world), None)
    first = {0: derived.coordinator_bytes}  # rank 0's GLOBAL values, placed against before anything shared
    world_loads = {r: first.get(r, 0) + loads_from.get(world_name, {}).get(r, 0) for r in range(world)}
    for (name, rank), (size,) in last.items():
        base = first if name == world_name else world_loads
        mine = base.get(rank, 0) + loads_from[name][rank]
        for other in sets[name]:
            assert mine - size <= base.get(other, 0) + loads_from[name].get(other, 0)


def _check_same_metadata_as_the_coordinator(derived, reference_planner):
    _, reference = reference_planner.create_global_plan(derived.local)
    _, metadata = verified_global_plan(commit_reports(derived), len(derived.local), "ckpt")
    assert metadata.state_dict_metadata.keys() == reference.state_dict_metadata.keys()
    for fqn, ours in metadata.state_dict_metadata.items():
        theirs = reference.state_dict_metadata[fqn]
        if hasattr(theirs, "chunks"):
            assert (ours.size, ours.properties.dtype) == (theirs.size, theirs.properties.dtype)
            boxes = sorted((tuple(c.offsets), tuple(c.sizes)) for c in ours.chunks)
            assert boxes == sorted((tuple(c.offsets), tuple(c.sizes)) for c in theirs.chunks), fqn
    assert metadata.planner_data == reference.planner_data


# --- whole jobs --------------------------------------------------------------------------------

@SETTINGS
@given(jobs())
def test_every_unique_item_is_written_once_by_a_holder(job):
    _check_written_once_by_a_holder(_job_plans(job))


@SETTINGS
@given(jobs())
def test_each_replica_set_is_balanced_over_its_members(job):
    _check_balanced_per_set(_job_plans(job))


@SETTINGS
@given(jobs())
def test_the_coordinator_builds_the_same_metadata_from_the_reports(job):
    derived = _job_plans(job)
    _, planners = save_plans([dict(job.states)] * job.topology.world_size, job.layouts, job.topology, job.policy)
    _check_same_metadata_as_the_coordinator(derived, planners[0])


@SETTINGS
@given(jobs(), st.sampled_from([SharingPattern.REPLICATED, SharingPattern.PER_RANK]))
def test_with_only_replicated_and_per_rank_state_the_plans_are_the_coordinator_s(job, other):
    names = sorted(job.layouts)
    layouts = {name: ComponentLayout(name, SharingPattern.REPLICATED if i % 2 == 0 else other)
               for i, name in enumerate(names)}
    job = dataclasses.replace(job, layouts=layouts)
    derived = _job_plans(job)
    reference = assign_writers(derived.local)
    assert [sorted(map(item_key, p.items), key=str) for p in derived.finals] == \
        [sorted(map(item_key, p.items), key=str) for p in reference]
    loads = plan_loads(derived.finals)
    shared = [item_bytes(i) for p in derived.local for i in p.items
              if top_level_key(i.index.fqn) in {n for n, lay in layouts.items()
                                                 if lay.pattern is SharingPattern.REPLICATED}]
    if other is SharingPattern.REPLICATED and shared:
        assert max(loads) <= sum(loads) / len(loads) + max(shared)


@settings(max_examples=60, deadline=None)
@given(reshard_cases())
def test_dtensor_shards_replicas_and_empty_shards_are_placed_by_their_holders(case):
    derived = _case_plans(case)
    _check_written_once_by_a_holder(derived)
    _check_balanced_per_set(derived)
    states = [case.state(rank, loading=False) for rank in range(case.saved.world_size)]
    _, planners = save_plans(states, RESHARD_LAYOUTS, case.saved, case.policy)
    _check_same_metadata_as_the_coordinator(derived, planners[0])


# --- disagreement and what cannot be derived ---------------------------------------------------

def _replicated_states(world: int, odd_rank: int | None, change: str) -> list[dict]:
    states = []
    for rank in range(world):
        model = {"w": torch.empty(64, device="meta"), "b": torch.empty(8, device="meta"), "loader": {"pos": 3}}
        if rank == odd_rank:
            if change == "shape":
                model["b"] = torch.empty(9, device="meta")
            elif change == "extra key":
                model["extra"] = torch.empty(2, device="meta")
            elif change == "empty here, filled elsewhere":  # a loader whose state lives on other ranks
                model["loader"] = {}
            else:  # a key missing
                del model["b"]
        states.append({"model": model, "rng": {"x": torch.empty(rank + 1, device="meta")}})
    return states


@pytest.mark.parametrize("change", ["shape", "extra key", "missing key", "empty here, filled elsewhere"])
def test_ranks_holding_different_shared_state_do_not_agree(change):
    layouts = {"model": ComponentLayout("model", SharingPattern.REPLICATED),
               "rng": ComponentLayout("rng", SharingPattern.PER_RANK)}
    topology = Topology.uniform(0, 4)
    same = derived_plans(_replicated_states(4, None, change), layouts, topology, ChunkPolicy())
    assert all_agree(same.summed)  # PER_RANK state may differ freely: each rank writes its own
    odd = derived_plans(_replicated_states(4, 2, change), layouts, topology, ChunkPolicy())
    assert not all_agree(odd.summed)


class _RowsOfRank:
    """A sharded value of its own kind (DCP's checkpoint protocol, like ShardedTensor): rank r holds row r."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        offsets, sizes = torch.Size((self.rank, 0)), torch.Size((1, 4))
        return [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD, tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets, sizes), properties=TensorProperties(dtype=torch.float32),
            size=torch.Size((self.world, 4))))]


def test_shards_of_a_kind_the_declarations_cannot_place_need_every_rank_s_plan():
    layouts = {"w": ComponentLayout("w", SharingPattern.GLOBAL)}
    states = [{"w": {"s": _RowsOfRank(rank, 3)}} for rank in range(3)]
    derived = derived_plans(states, layouts, Topology.uniform(0, 3), ChunkPolicy())
    assert all(isinstance(s, str) and "'w.s'" in s for s in derived.summaries)


def test_the_coordinator_refuses_reports_missing_or_repeating_an_item():
    layouts = {"model": ComponentLayout("model", SharingPattern.REPLICATED)}
    states = [{"model": {f"t{i}": torch.empty(16, device="meta") for i in range(6)}}] * 3
    derived = derived_plans(states, layouts, Topology.uniform(0, 3), ChunkPolicy())
    reports = commit_reports(derived)
    verified_global_plan(reports, 3, "ckpt")
    short = list(reports)
    short[1] = dataclasses.replace(short[1], plan=SavePlan(short[1].plan.items[1:]), item_sets=short[1].item_sets[1:])
    with pytest.raises(IncompleteSaveError, match="an item is missing"):
        verified_global_plan(short, 3, "ckpt")
    doubled = list(reports)
    doubled[2] = dataclasses.replace(doubled[2], plan=SavePlan(doubled[2].plan.items + doubled[1].plan.items[:1]),
                                     item_sets=doubled[2].item_sets + doubled[2].item_sets[:1])
    with pytest.raises(IncompleteSaveError, match="written twice"):
        verified_global_plan(doubled, 3, "ckpt")
    with pytest.raises(IncompleteSaveError, match="did not all report"):
        verified_global_plan([reports[0], reports[1], dataclasses.replace(reports[2], sets=())], 3, "ckpt")


def test_the_coordinator_s_own_digests_vouch_only_for_its_own_items():
    """Passing the sets the coordinator digested while planning changes nothing it accepts or refuses:
    its digest stands for exactly the items it summarized, so an item dropped, repeated or changed in
    the report is still found."""
    layouts = {"model": ComponentLayout("model", SharingPattern.REPLICATED),
               "rng": ComponentLayout("rng", SharingPattern.PER_RANK)}
    states = [{"model": {f"t{i}": torch.empty(4 + i, device="meta") for i in range(5)},
               "rng": {"s": torch.empty(3, device="meta")}}]
    derived = derived_plans(states, layouts, Topology.uniform(0, 1), ChunkPolicy())
    (report,) = commit_reports(derived)
    digested = derived.summaries[0].sets
    verified_global_plan([report], 1, "ckpt", digested)
    items, sets = list(report.plan.items), report.item_sets
    bigger = dataclasses.replace(items[1], tensor_data=dataclasses.replace(
        items[1].tensor_data, size=torch.Size([99]),
        chunk=ChunkStorageMetadata(torch.Size([0]), torch.Size([99]))))
    tampered = {
        "an item is missing": (items[1:], sets[1:]),
        "written twice": (items + items[:1], sets + sets[:1]),
        "not exactly what they hold": ([items[0], bigger, *items[2:]], sets),
    }
    for why, (changed, changed_sets) in tampered.items():
        bad = dataclasses.replace(report, plan=SavePlan(changed), item_sets=changed_sets)
        with pytest.raises(IncompleteSaveError, match=why):
            verified_global_plan([bad], 1, "ckpt", digested)


def test_a_report_that_stays_in_the_coordinator_s_process_is_checked_by_its_very_items():
    """In one process the coordinator's report leaves out the digests of the sets it alone holds: the
    very items it summarized vouch for them, so none is taken; any other report, or any change to
    the items, is still refused."""
    layouts = {"model": ComponentLayout("model", SharingPattern.REPLICATED)}
    states = [{"model": {f"t{i}": torch.empty(4 + i, device="meta") for i in range(5)}}]
    derived = derived_plans(states, layouts, Topology.uniform(0, 1), ChunkPolicy())
    summary, final = derived.summaries[0], derived.finals[0]
    assert isinstance(summary, PlanSummary)
    fresh = summarize(final, lambda item: (b"0", range(1)), 0, 1)  # the same set, not yet digested
    assert isinstance(fresh, PlanSummary)
    report = fresh.commit_report(final, in_process=True)
    assert [digest for _, _, _, digest in report.sets] == [None]
    verified_global_plan([report], 1, "ckpt", fresh.sets)
    assert "digest" not in vars(fresh.sets[0])  # never taken
    with pytest.raises(IncompleteSaveError, match="not exactly what they hold"):
        verified_global_plan([report], 1, "ckpt")  # no summary to vouch for it
    alike = derived_plans(states, layouts, Topology.uniform(0, 1), ChunkPolicy()).summaries[0]
    with pytest.raises(IncompleteSaveError, match="not exactly what they hold"):
        verified_global_plan([report], 1, "ckpt", alike.sets)  # equal items, but other objects
    verified_global_plan([summary.commit_report(final)], 1, "ckpt", alike.sets)  # with its digest: accepted
    items = list(report.plan.items)
    for changed, changed_sets in [(items[1:], report.item_sets[1:]), (items + items[:1], report.item_sets * 2)]:
        bad = dataclasses.replace(report, plan=SavePlan(changed), item_sets=changed_sets[:len(changed)])
        with pytest.raises(IncompleteSaveError, match="not exactly what they hold"):
            verified_global_plan([bad], 1, "ckpt", fresh.sets)


def test_the_coordinator_s_global_values_count_in_the_balance():
    layouts = {"model": ComponentLayout("model", SharingPattern.REPLICATED),
               "ema": ComponentLayout("ema", SharingPattern.GLOBAL)}
    states = [{"model": {f"t{i}": torch.empty(1 << 18, device="meta") for i in range(8)},  # 1 MiB each
               "ema": {"w": torch.empty(3 << 18, device="meta")}}] * 4  # 3 MiB on rank 0 only
    derived = derived_plans(states, layouts, Topology.uniform(0, 4), ChunkPolicy())
    _check_written_once_by_a_holder(derived)
    loads = plan_loads(derived.finals)
    assert derived.coordinator_bytes == 3 << 20
    assert max(loads) <= sum(loads) / 4 + (1 << 20)  # rank 0 takes less of the model
    assert loads[0] == 3 << 20  # the 8 model tensors went to the 3 other ranks


def _write_item(fqn: str, kind: int, shape: tuple[int, ...], dtype: torch.dtype, row: int) -> WriteItem:
    if kind == 0:
        return WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)
    offsets = torch.Size([row] + [0] * (len(shape) - 1)) if shape else torch.Size([])
    item_type = WriteItemType.SHARD if kind == 2 else WriteItemType.TENSOR
    return WriteItem(index=MetadataIndex(fqn, offsets), type=item_type, tensor_data=TensorWriteData(
        chunk=ChunkStorageMetadata(offsets, torch.Size(shape)), properties=TensorProperties(dtype=dtype),
        size=torch.Size(shape)))


_digest_items = st.lists(st.builds(
    _write_item, st.text(max_size=3), st.integers(0, 2), st.lists(st.integers(0, 3), max_size=2).map(tuple),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64]), st.integers(0, 2)), max_size=6,
    unique_by=lambda item: index_order(item.index))  # a set holds each key once


@SETTINGS
@given(_digest_items, _digest_items, st.randoms())
def test_items_digest_is_equal_exactly_when_the_items_are(first: list[WriteItem], second: list[WriteItem],
                                                          rng: object) -> None:
    """Members compare sets by digest: it must not depend on order, and must tell any described
    difference (key, offsets, kind, shape, dtype, chunk) apart."""
    def described(items: list[WriteItem]) -> list:
        return sorted(((index_order(it.index), describe_item(it)) for it in items), key=repr)

    shuffled = list(first)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    assert items_digest(shuffled) == items_digest(first)
    assert (items_digest(first) == items_digest(second)) == (described(first) == described(second))
