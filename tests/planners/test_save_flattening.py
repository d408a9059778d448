"""ForgeSavePlanner flattens a state exactly as DCP's DefaultSavePlanner does (flatten_state_dict and
flatten_sharded_tensors both on), though it walks the state a second time only for ShardedTensors;
and it finds every empty dictionary of the state (which DCP's flattening drops), though it walks
into containers only."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from hypothesis import given, settings
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from dcp_forge.core.key_paths import Step, empty_mappings
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


def _every_empty_mapping(state: dict) -> list:
    """Every empty dictionary DCP's flattening would drop, found by walking every value."""
    found = []

    def walk(value, path, steps):
        if isinstance(value, Mapping):
            if not value:
                found.append((path, steps, value))
            for key, item in value.items():
                walk(item, (*path, str(key)), (*steps, Step(key)))
        elif isinstance(value, list) and _dcp_walks(value):
            for i, item in enumerate(value):
                walk(item, (*path, i), (*steps, Step(i, index=True)))

    for key, value in state.items():
        walk(value, (str(key),), (Step(key),))
    return found


def _dcp_walks(items: list) -> bool:
    return any(isinstance(v, (Mapping, torch.Tensor)) or (isinstance(v, list) and _dcp_walks(v)) for v in items)


@settings(max_examples=80, deadline=None)
@given(value_trees())
def test_every_empty_mapping_is_found_with_its_path(tree: dict) -> None:
    state = {"model": build_values(tree), "extra": {"nested": [{}, torch.zeros(1), [{}]], "leaf": 3, "e": {}}}
    assert [(p, s) for p, s, _ in empty_mappings(state)] == [(p, s) for p, s, _ in _every_empty_mapping(state)]
    assert all(found is expected for (_, _, found), (_, _, expected)
               in zip(empty_mappings(state), _every_empty_mapping(state), strict=True))
