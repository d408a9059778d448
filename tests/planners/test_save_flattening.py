"""ForgeSavePlanner flattens a state exactly as DCP's DefaultSavePlanner does (flatten_state_dict and
flatten_sharded_tensors both on), though it walks the state a second time only for ShardedTensors."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from dcp_forge.planners import ForgeSavePlanner
from tests.support.strategies import build_values, value_trees


def _dcp_flattened(state: dict) -> dict:
    planner = DefaultSavePlanner(flatten_state_dict=True, flatten_sharded_tensors=True)
    planner.set_up_planner(state)
    return planner.state_dict


def _same_values(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    assert all(ours[k] is theirs[k] for k in theirs)


@settings(max_examples=60, deadline=None)
@given(value_trees())
def test_the_flattened_state_is_dcp_s(tree: dict) -> None:
    state = {"model": build_values(tree)}
    planner = ForgeSavePlanner()
    planner.set_up_planner(state)
    flattened = {k: v for k, v in planner.state_dict.items() if k in planner.mappings and k not in planner._empty_mappings}
    _same_values(flattened, _dcp_flattened({planner.key_map["model"]: state["model"]}))


class _ShardContainer(torch.Tensor):
    """A tensor of another kind that offers ``local_shards``, as a ShardedTensor does."""

    def local_shards(self) -> list:
        return []


def test_a_state_offering_shards_takes_dcp_s_sharded_tensor_flattening() -> None:
    container = torch.Tensor._make_subclass(_ShardContainer, torch.zeros(2))
    state = {"model": {"w": container, "b": torch.ones(3), "nested": {"x": torch.zeros(1)}}}
    planner = ForgeSavePlanner()
    planner.set_up_planner(state)
    _same_values(planner.state_dict, _dcp_flattened({planner.key_map["model"]: state["model"]}))
