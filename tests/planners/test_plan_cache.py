"""Plans reused from one save to the next (planners/plan_cache.py): only while nothing a plan is made
from changed, never across coordinators, and only once the save that made them committed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch.distributed.tensor import Replicate, Shard

from dcp_forge import AsyncOptions, CheckpointCoordinator, CheckpointExistsError, StateComponent
from dcp_forge._torch_compat import flatten_state_dict
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.core.tensors import is_plain_tensor
from dcp_forge.format.values import has_opaque_layout
from dcp_forge.planners.plan_cache import state_signature
from tests.support.statefuls import Box, Counter
from tests.support.strategies import build_values, dtensor_on_rank, value_trees


def _state(**changes) -> dict:
    state = {
        "model": {"w": torch.zeros(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "fsdp": {"d": dtensor_on_rank((6, 2), torch.float32, (2,), 1, (Shard(0),))},
        "trainer": {"step": 3},
    }
    for path, value in changes.items():
        component, key = path.split("__")
        state[component][key] = value
    return state


def _signature(state: dict, context: bytes = b"rank 1 of 2") -> bytes | None:
    flat, paths = flatten_state_dict(state)
    return state_signature(flat, paths, context)


def test_the_signature_ignores_values():
    other = _state(model__w=torch.ones(4, 3), trainer__step=4, model__b=torch.ones(3, dtype=torch.bfloat16))
    assert _signature(_state()) == _signature(other) is not None


@pytest.mark.parametrize("change", [
    {"model__w": torch.zeros(4, 4)},  # shape
    {"model__b": torch.zeros(3)},  # dtype
    {"model__w": torch.zeros(4, 3, requires_grad=True)},  # tensor properties DCP records
    {"model__new": torch.zeros(1)},  # a key more
    {"trainer__step": torch.zeros(1)},  # a value became a tensor
    {"fsdp__d": dtensor_on_rank((6, 2), torch.float32, (2,), 1, (Replicate(),))},  # placements
    {"fsdp__d": dtensor_on_rank((6, 2), torch.float32, (2,), 0, (Shard(0),))},  # coordinate on the mesh
    {"fsdp__d": dtensor_on_rank((7, 2), torch.float32, (2,), 1, (Shard(0),))},  # global shape
])
def test_the_signature_changes_with_anything_a_plan_is_made_from(change):
    assert _signature(_state(**change)) != _signature(_state())


def test_the_signature_covers_the_context_and_nesting():
    assert _signature(_state(), b"rank 0 of 2") != _signature(_state())
    nested = _state()
    nested["model"] = {"w": nested["model"]["w"], "x": {"b": nested["model"]["b"]}}
    flat = _state()
    flat["model"] = {"w": flat["model"]["w"], "x.b": flat["model"]["b"]}
    assert _signature(nested) != _signature(flat)  # same flattened keys, different paths


def _components(model: Box, step: Counter) -> list[StateComponent]:
    return [StateComponent("model", model, "replicated"), StateComponent("trainer", step, "global")]


def test_repeated_saves_reuse_the_plan_until_the_structure_changes(tmp_path):
    model, step = Box({"w": torch.arange(12.0).reshape(4, 3)}), Counter(1)
    coord = CheckpointCoordinator(_components(model, step), output_dir=tmp_path,
                                  chunk_policy=ChunkPolicy(min_chunk_bytes=16))
    coord.save_checkpoint(checkpoint_id="a")
    assert coord.plan_cache.hits == 0
    model.state["w"] += 1
    step.step = 2
    coord.save_checkpoint(checkpoint_id="b")
    assert coord.plan_cache.hits == 1
    with pytest.raises(CheckpointExistsError):  # a failed save keeps the plans of the last committed one
        coord.save_checkpoint(checkpoint_id="b")
    model.state["w"] = torch.arange(15.0).reshape(5, 3)  # new shape: planned afresh, never from the cache
    coord.save_checkpoint(checkpoint_id="c")
    assert coord.plan_cache.hits == 1
    coord.save_checkpoint(checkpoint_id="d")
    assert coord.plan_cache.hits == 2
    for name, expected_w, expected_step in [("a", torch.arange(12.0).reshape(4, 3), 1),
                                            ("b", torch.arange(12.0).reshape(4, 3) + 1, 2),
                                            ("d", torch.arange(15.0).reshape(5, 3), 2)]:
        loaded, counter = Box({"w": torch.zeros_like(expected_w)}), Counter()
        CheckpointCoordinator(_components(loaded, counter), output_dir=tmp_path).load_checkpoint(tmp_path / name)
        assert torch.equal(loaded.state["w"], expected_w) and counter.step == expected_step


@pytest.mark.filterwarnings("ignore::UserWarning")  # DCP's single-process notice, from its upload thread
@pytest.mark.parametrize("upload", ["thread", pytest.param("process", marks=pytest.mark.proc)])
def test_async_saves_reuse_the_plan_wherever_they_upload(tmp_path, upload):
    model, step = Box({"w": torch.arange(12.0).reshape(4, 3)}), Counter(1)
    with CheckpointCoordinator(_components(model, step), output_dir=tmp_path,
                               async_options=AsyncOptions(upload=upload)) as coord:
        planned = []
        for name, w in [("a", model.state["w"]), ("b", model.state["w"] + 1), ("c", torch.arange(15.0).reshape(5, 3)),
                        ("d", torch.arange(15.0).reshape(5, 3) - 1)]:
            model.state["w"] = w.clone()
            handle = coord.async_save(checkpoint_id=name)
            handle.result()
            planned.append(handle.planned_by)
    # The upload process keeps plans of its own: a new shape is planned afresh there too.
    assert planned == ["declarations", "cache", "declarations", "cache"]
    loaded = Box({"w": torch.zeros(5, 3)})
    CheckpointCoordinator(_components(loaded, Counter()), output_dir=tmp_path).load_checkpoint(tmp_path / "d")
    assert torch.equal(loaded.state["w"], torch.arange(15.0).reshape(5, 3) - 1)


def test_each_coordinator_keeps_its_own_plans(tmp_path):
    first = CheckpointCoordinator(_components(Box({"w": torch.zeros(3)}), Counter()), output_dir=tmp_path / "1")
    second = CheckpointCoordinator(_components(Box({"w": torch.zeros(3)}), Counter()), output_dir=tmp_path / "2")
    first.save_checkpoint(checkpoint_id="a")
    second.save_checkpoint(checkpoint_id="a")
    assert first.plan_cache.hits == second.plan_cache.hits == 0
    assert first.plan_cache.plan is not second.plan_cache.plan


@settings(max_examples=60, deadline=None)
@given(value_trees())
def test_the_signature_is_the_same_whether_the_opaque_tensors_are_told_or_found(tree):
    """The planner tells state_signature which tensors it found opaque (quantized, sparse, nested):
    the signature must not change by it."""
    flat, paths = flatten_state_dict({"model": build_values(tree)})
    opaque = {k for k, v in flat.items() if is_plain_tensor(v) and has_opaque_layout(v)}
    assert state_signature(flat, paths, b"ctx", opaque) == state_signature(flat, paths, b"ctx")
