"""Properties of planning over random topologies, patterns and state dicts (one process)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType

from dcp_forge.core.keys import parse_storage_key, top_level_key
from dcp_forge.core.patterns import SharingPattern
from dcp_forge.core.placement import ChunkPolicy, assign_writers, chunk_boxes, item_bytes, plan_loads
from dcp_forge.core.topology import Topology
from dcp_forge.planners import ForgeSavePlanner
from tests.support.strategies import jobs, local_plans

SETTINGS = settings(max_examples=150, deadline=None)


def _global(job):
    plans, planners = local_plans(job)
    global_plans, metadata = planners[0].create_global_plan(plans)
    return plans, global_plans, metadata


def _holders(plans):
    out = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            out.setdefault(item.index, []).append(rank)
    return out


@SETTINGS
@given(jobs())
def test_every_unique_byte_is_written_exactly_once(job):
    plans, global_plans, metadata = _global(job)
    written = {}
    for rank, plan in enumerate(global_plans):
        for item in plan.items:
            assert item.index not in written, f"{item.index} written twice"
            written[item.index] = rank
    holders = _holders(plans)
    assert set(written) == set(holders)  # nothing lost, nothing invented
    for idx, rank in written.items():
        assert rank in holders[idx]
    # Chunks of each tensor tile it exactly: every element covered once.
    for fqn, md in metadata.state_dict_metadata.items():
        if not hasattr(md, "chunks"):
            continue
        cover = np.zeros(tuple(md.size), dtype=np.int32)
        for chunk in md.chunks:
            cover[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))] += 1
        assert (cover == 1).all(), f"{fqn} not tiled exactly once"


@SETTINGS
@given(jobs())
def test_each_pattern_is_written_by_the_ranks_that_hold_it(job):
    _, global_plans, _ = _global(job)
    topo = job.topology
    for rank, plan in enumerate(global_plans):
        for item in plan.items:
            key = parse_storage_key(top_level_key(item.index.fqn))
            layout = job.layouts[key.component]
            if layout.pattern is SharingPattern.GLOBAL:
                assert rank == 0
            elif layout.pattern is SharingPattern.PER_RANK:
                assert rank == key.rank
            elif layout.pattern is SharingPattern.PER_NODE:
                assert topo.node_of_rank[rank] == key.node
            elif layout.pattern is SharingPattern.PER_GROUP:
                assert rank in key.group_ranks and key.group_ranks == topo.group_of(layout.group_name, rank)


@SETTINGS
@given(jobs())
def test_each_rank_was_least_loaded_when_it_got_its_last_shared_item(job):
    """The greedy guarantee behind the balance bound, checked on the final plans."""
    plans, global_plans, _ = _global(job)
    holders = _holders(plans)
    loads = plan_loads(global_plans)
    for rank, plan in enumerate(global_plans):
        shared = [it for it in plan.items if len(holders[it.index]) > 1]
        if not shared:
            continue
        # placement order is (-size, fqn, offset): the last one is smallest, then latest in key order
        last = sorted(shared, key=lambda it: (-item_bytes(it), it.index.fqn, tuple(it.index.offset or ())))[-1]
        for other in holders[last.index]:
            assert loads[rank] - item_bytes(last) <= loads[other]


@SETTINGS
@given(jobs(), st.randoms())
def test_plans_do_not_depend_on_who_computes_them_or_item_order(job, rnd):
    plans, planners = local_plans(job)
    def assignment(global_plans):  # the index hint DCP rewrites depends on order; compare (fqn, offset)
        return [sorted((i.index.fqn, tuple(i.index.offset or ())) for i in p.items) for p in global_plans]

    reference = assignment(planners[0].create_global_plan(plans)[0])
    for planner in planners[1:]:
        shuffled = [SavePlan(rnd.sample(p.items, len(p.items)), planner_data=p.planner_data) for p in plans]
        assert assignment(planner.create_global_plan(shuffled)[0]) == reference


@pytest.mark.parametrize("world", range(1, 9))
def test_single_1gib_tensor_is_balanced_below_the_tensor_level(world):
    """The balance bound: busiest rank <= 1.05 x mean + one chunk, for one replicated 1 GiB tensor."""
    plans, planners = [], []
    for rank in range(world):
        planner = ForgeSavePlanner({"model": "replicated"}, Topology.uniform(rank, world), planning_only=True)
        planner.set_up_planner({"model": {"w": torch.empty(1 << 28, device="meta")}})
        plans.append(planner.create_local_plan())
        planners.append(planner)
    global_plans, _ = planners[0].create_global_plan(plans)
    loads = plan_loads(global_plans)
    largest = max(item_bytes(i) for p in global_plans for i in p.items)
    assert sum(loads) == 1 << 30
    assert max(loads) <= 1.05 * (sum(loads) / world) + largest
    assert min(loads) > 0  # every rank writes
    if world > 1:
        assert largest <= (1 << 30) // world  # finer than one piece per rank


@SETTINGS
@given(st.integers(1, 8), st.lists(st.integers(1, 1 << 22), min_size=1, max_size=30))
def test_balance_bound_for_replicated_state(world, sizes):
    state = {f"t{i}": torch.empty(n, device="meta") for i, n in enumerate(sizes)}
    policy = ChunkPolicy(min_chunk_bytes=1 << 16)
    plans, planners = [], []
    for rank in range(world):
        planner = ForgeSavePlanner({"m": "replicated"}, Topology.uniform(rank, world), chunk_policy=policy,
                                   planning_only=True)
        planner.set_up_planner({"m": state})
        plans.append(planner.create_local_plan())
        planners.append(planner)
    loads = plan_loads(planners[0].create_global_plan(plans)[0])
    largest = max(item_bytes(i) for p in plans for i in p.items)
    assert max(loads) <= 1.05 * sum(loads) / world + largest


@given(st.lists(st.integers(1, 50), min_size=0, max_size=3), st.sampled_from([1, 2, 4, 8]),
       st.integers(1, 8), st.sampled_from([1, 16, 1024]))
def test_chunk_boxes_tile_the_tensor(shape, itemsize, holders, min_chunk):
    boxes = chunk_boxes(shape, itemsize, holders, ChunkPolicy(min_chunk_bytes=min_chunk))
    cover = np.zeros(shape, dtype=np.int32)
    for offsets, sizes in boxes:
        cover[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
    assert (cover == 1).all()
    if boxes and len(boxes) > 1:
        assert all(math.prod(s) * itemsize >= min_chunk for _, s in boxes)


def test_holders_disagreeing_on_shape_is_a_clear_error():
    plans = []
    for rank, n in enumerate([4, 5]):
        planner = ForgeSavePlanner({"model": "replicated"}, Topology.uniform(rank, 2))
        planner.set_up_planner({"model": {"w": torch.zeros(n)}})
        plans.append(planner.create_local_plan())
    with pytest.raises(ValueError, match=r"ranks 0 and 1 declare 'model.w'"):
        assign_writers(plans)


def test_global_values_are_planned_on_rank_zero_only():
    plans = []
    for rank in range(3):
        planner = ForgeSavePlanner({"trainer": "global"}, Topology.uniform(rank, 3))
        planner.set_up_planner({"trainer": {"step": rank, "t": torch.zeros(3)}})
        plans.append(planner.create_local_plan())
    assert [len(p.items) for p in plans] == [2, 0, 0]
    assert all(i.type in (WriteItemType.BYTE_IO, WriteItemType.TENSOR) for i in plans[0].items)
