"""A dictionary empty on some holders of a shared storage key and filled on others is stored as the
filled one (a data loader whose state lives on one rank of its group); one nobody fills is kept."""

from __future__ import annotations

import torch

from dcp_forge.core.patterns import SharingPattern
from dcp_forge.core.topology import Topology
from dcp_forge.planners import ForgeSavePlanner


def _plan(states: list[dict], pattern: SharingPattern = SharingPattern.REPLICATED):
    world = len(states)
    planners, plans = [], []
    for rank, state in enumerate(states):
        planner = ForgeSavePlanner({"loader": pattern}, Topology(rank=rank, world_size=world))
        planner.set_up_planner({"loader": state}, is_coordinator=rank == 0)
        plans.append(planner.create_local_plan())
        planners.append(planner)
    return planners[0].create_global_plan(plans)


def test_an_empty_state_beside_a_filled_one_is_not_stored():
    _, metadata = _plan([{"sampler": {"epoch": 3, "seen": torch.arange(4)}}, {}])
    assert set(metadata.state_dict_metadata) == {"loader.sampler.epoch", "loader.sampler.seen"}
    assert "" not in (metadata.planner_data or {}) and "loader" not in (metadata.planner_data or {})


def test_a_nested_empty_dict_beside_a_filled_one_is_not_stored():
    _, metadata = _plan([{"sampler": {"epoch": 3}}, {"sampler": {}}])
    assert set(metadata.state_dict_metadata) == {"loader.sampler.epoch"}


def test_an_empty_dict_nobody_fills_is_stored():
    plans, metadata = _plan([{"sampler": {}, "step": 1}, {"sampler": {}, "step": 1}])
    assert set(metadata.state_dict_metadata) == {"loader.sampler", "loader.step"}
    assert sum(len(p.items) for p in plans) == 2  # each written once
    assert "" not in metadata.planner_data
