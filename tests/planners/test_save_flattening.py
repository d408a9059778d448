"""ForgeSavePlanner flattens a state exactly as DCP's DefaultSavePlanner does (flatten_state_dict and
flatten_sharded_tensors both on), though it walks the state a second time only for ShardedTensors;
it finds every empty dictionary of the state (which DCP's flattening drops), and every name whose
path passes a key that is not a string, though it walks into containers only."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from dcp_forge._torch_compat import flatten_state_dict
from dcp_forge.core.key_paths import Step, empty_mappings, typed_paths
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


def _typed_by_following_each_name(root: dict, flat_paths: dict) -> dict:
    """typed_paths by its definition: follow each name's path and keep those passing a non-str key."""
    out = {}
    for name, path in flat_paths.items():
        node, steps = root, []
        for part in path:
            if isinstance(node, Mapping):
                key = next(k for k in node if str(k) == part)
                steps.append(Step(key))
            else:
                key = part
                steps.append(Step(key, index=True))
            node = node[key]
        if any(not s.index and type(s.key) is not str for s in steps):
            out[name] = tuple(steps)
    return out


@settings(max_examples=80, deadline=None)
@given(value_trees(), st.booleans())
def test_typed_paths_are_those_through_a_key_that_is_not_a_string(tree: dict, nest_in_list: bool) -> None:
    inner = build_values(tree)
    state = {"model": [torch.zeros(1), inner] if nest_in_list else inner, "other": {"w": torch.ones(2)}}
    flat, paths = flatten_state_dict(state)
    assert typed_paths(state, paths) == _typed_by_following_each_name(state, paths)
