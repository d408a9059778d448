"""Replication validation: digests and comparisons as pure functions (hypothesis), and on 4 real gloo
ranks (2 nodes x 2, stage groups {0,2} {1,3}) every injected divergence is caught at every level and
pattern, named by component, tensor and rank, and nothing is committed."""

from __future__ import annotations

import logging
import os
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_forge import (
    CheckpointCoordinator,
    ComponentDeclarationError,
    ReplicationError,
    SharingPattern,
    StateComponent,
    ValidationLevel,
    latest_checkpoint,
)
from dcp_forge.replication import (
    check_replication,
    digest_disagreements,
    element_disagreement,
    quick_digest,
    split_by_value,
    tensor_digests,
    value_digest,
)
from tests.support.statefuls import Box
from tests.support.strategies import DTYPES

PATTERNS = [SharingPattern.REPLICATED, SharingPattern.PER_GROUP, SharingPattern.PER_NODE]
LEVELS = [ValidationLevel.QUICK, ValidationLevel.TENSOR, ValidationLevel.FULL]


# --- pure ---------------------------------------------------------------------------------------
@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES + [torch.float64, torch.bool, torch.int8]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return (torch.rand(shape, generator=gen) * 100).to(dtype)


def one_ulp(t: torch.Tensor, flat_index: int) -> torch.Tensor:
    """A copy of ``t`` with one element's lowest bit flipped: one ulp for floats, +-1 for integers."""
    out = t.clone().reshape(-1)
    if t.dtype == torch.bool:
        out[flat_index] = ~out[flat_index]
    else:
        bits = out.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
        bits[flat_index] ^= 1
    return out.reshape(t.shape)


@settings(max_examples=150, deadline=None)
@given(tensors(), st.data())
def test_any_one_element_change_changes_every_digest(t, data):
    index = data.draw(st.integers(0, t.numel() - 1))
    moved = one_ulp(t, index)
    assert not torch.equal(moved.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert value_digest(moved) != value_digest(t)
    assert quick_digest({"w": moved}) != quick_digest({"w": t})
    assert tensor_digests({"a": {"w": moved}}) != tensor_digests({"a": {"w": t}})
    report = element_disagreement(t, moved)
    assert report is not None and report.startswith("1 of ")
    assert element_disagreement(t, t.clone()) is None


@settings(max_examples=50, deadline=None)
@given(tensors())
def test_digests_depend_on_values_not_on_memory_layout(t):
    strided = torch.empty((*t.shape, 2), dtype=t.dtype)[..., 0]
    strided.copy_(t)
    assert value_digest(strided) == value_digest(t)  # a non-contiguous view hashes its values only
    assert value_digest(t.clone()) == value_digest(t)


def test_comparisons_are_bitwise():
    nan = torch.tensor([float("nan"), 1.0])
    assert value_digest(nan) == value_digest(nan.clone()) and element_disagreement(nan, nan.clone()) is None
    zero, negative_zero = torch.tensor([0.0]), torch.tensor([-0.0])
    assert value_digest(zero) != value_digest(negative_zero)
    assert element_disagreement(zero, negative_zero) == "1 of 1 elements differ, first at (0,), max abs diff 0"
    assert value_digest(torch.zeros(2)) != value_digest(torch.zeros(2, dtype=torch.float64))
    assert value_digest(torch.zeros(2, 3)) != value_digest(torch.zeros(3, 2))
    assert "vs" in element_disagreement(torch.zeros(2, 3), torch.zeros(3, 2))
    assert element_disagreement(5, 5) is None and element_disagreement("a", "b") == "'a' vs 'b'"


def test_digests_see_view_flags_quantizers_and_sparse_indices():
    """Tensors equal in their storage's bytes but not as values digest differently; rebuilt alike,
    the same (a lazy view digests as its storage's bytes and its flags, as it is stored)."""
    def x():
        return torch.arange(4.0).to(torch.complex64)

    def ints():
        return torch.arange(6, dtype=torch.int8)

    def coo():
        return torch.sparse_coo_tensor(torch.tensor([[0, 0]]), torch.tensor([1.0, 2.0]), (3,))

    pairs = [(lambda: x().conj(), x), (lambda: torch._neg_view(x().real), lambda: x().real),
             (lambda: torch._make_per_tensor_quantized_tensor(ints(), 0.5, 0),
              lambda: torch._make_per_tensor_quantized_tensor(ints(), 0.25, 0)),
             (coo, lambda: coo().coalesce()), (lambda: torch.eye(3).to_sparse_csr(), lambda: torch.eye(3).to_sparse_csc())]
    for one, other in pairs:
        assert value_digest(one()) != value_digest(other())
        assert value_digest(one()) == value_digest(one())


def test_disagreements_name_the_odd_ranks():
    assert split_by_value({0: "a", 1: "b", 2: "a", 3: "a"}) == [[0, 2, 3], [1]]
    problems = digest_disagreements({0: {"w": "a", "b": "x"}, 1: {"w": "b", "b": "x"}, 2: {"w": "a"}})
    assert problems == ["'b': present on ranks [0, 1], absent on ranks [2]",
                        "'w': differs across ranks (ranks [0, 2]; ranks [1] each agree)"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("on_replication_mismatch", "ignore", "must be one of \\['raise', 'warn'\\]"),
    ("on_replication_mismatch", None, "must be one of"),
    ("validation_level", "thorough", "'validation_level' must be a ValidationLevel"),
    ("validate_replication", "yes", "'validate_replication' of component 'm' must be <bool>"),
])
def test_validation_options_are_validated(field, value, message):
    with pytest.raises(ComponentDeclarationError, match=message):
        StateComponent("m", torch.nn.Linear(1, 1), "replicated", **{field: value})


@pytest.mark.parametrize("pattern", ["global", "per_rank"])
def test_validation_needs_copies_to_compare(pattern):
    with pytest.raises(ComponentDeclarationError, match="needs copies to compare"):
        StateComponent("m", torch.nn.Linear(1, 1), pattern, validate_replication=True)


# --- real gloo ----------------------------------------------------------------------------------


def _copy_seed(pattern: SharingPattern, rank: int) -> int:
    """Which copy a rank holds: stage groups {0,2} {1,3}; nodes {0,1} {2,3}."""
    return {SharingPattern.REPLICATED: 0, SharingPattern.PER_GROUP: 10 + rank % 2,
            SharingPattern.PER_NODE: 20 + rank // 2}[pattern]


def _state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"layer": {"weight": torch.randn(48, 32, generator=gen), "bias": torch.randn(32, generator=gen)},
            "half": torch.randn(16, generator=gen).bfloat16(), "ids": torch.arange(12) * seed,
            "nan": torch.tensor([float("nan"), -1.0]), "step": 7, "name": f"copy-{seed}"}


TENSOR_KEYS = ["layer.weight", "layer.bias", "half", "ids"]


def _components(level: ValidationLevel, action: str = "raise") -> list[StateComponent]:
    import torch.distributed as dist

    rank = dist.get_rank()
    return [StateComponent(f"{p.value}_{level.value}", Box(_state(_copy_seed(p, rank))), p,
                           process_group_name="stage" if p is SharingPattern.PER_GROUP else None,
                           validate_replication=True, validation_level=level, on_replication_mismatch=action)
            for p in PATTERNS]


def _stage_groups():
    import torch.distributed as dist

    mine = None
    for members in ([0, 2], [1, 3]):  # collective: every rank creates every group in the same order
        pg = dist.new_group(members, backend="gloo")
        if dist.get_rank() in members:
            mine = pg
    return {"stage": mine}


def _perturb(state: dict, key: str, index: int) -> None:
    parent, leaf = (state["layer"], key.split(".")[1]) if key.startswith("layer.") else (state, key)
    parent[leaf] = one_ulp(parent[leaf], index)


def validation_scenarios(rank: int, world: int, root: str) -> dict:
    warnings.simplefilter("ignore")
    groups = _stage_groups()
    out: dict = {}

    # 1. consistent state (NaNs included) passes at every level, in one save.
    everything = [c for level in LEVELS for c in _components(level)]
    coord = CheckpointCoordinator(everything, groups, os.path.join(root, "ok"))
    out["consistent"] = os.path.basename(coord.save_checkpoint(checkpoint_id="checkpoint-1", validate=True))

    # 2. one ulp on rank 3, per pattern and level, through save_checkpoint: error, nothing committed.
    for level in LEVELS:
        components = _components(level)
        coord = CheckpointCoordinator(components, groups, os.path.join(root, level.value))
        for c in components:
            if rank == 3:
                _perturb(c.stateful.state, "layer.weight", 77)
            try:
                coord.save_checkpoint(checkpoint_id=f"bad-{c.key}", validate=True)
                out[c.key] = ("saved", None)
            except ReplicationError as err:
                out[c.key] = ("raised", str(err))
            if rank == 3:
                c.stateful.state = _state(_copy_seed(c.sharing_pattern, rank))
        out[f"latest-{level.value}"] = latest_checkpoint(os.path.join(root, level.value))
        out[f"left-{level.value}"] = sorted(os.listdir(os.path.join(root, level.value)))

    # 3. warn instead of raise: logged, and the save goes through.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("dcp_forge.replication").addHandler(handler)
    components = _components(ValidationLevel.TENSOR, action="warn")
    if rank == 0:
        components[0].stateful.state["step"] = 8
    coord = CheckpointCoordinator(components, groups, os.path.join(root, "warn"))
    out["warn_saved"] = os.path.basename(coord.save_checkpoint(checkpoint_id="checkpoint-1", validate=True))
    out["warn_logs"] = [r.getMessage() for r in records]

    # 4. state one rank cannot hash (a lambda cannot be pickled): every rank raises, nobody waits forever.
    odd = {"w": torch.ones(3), "fn": (lambda: 0) if rank == 1 else 0}
    coord = CheckpointCoordinator([StateComponent("odd", Box(odd), "replicated", validate_replication=True)],
                                  groups, os.path.join(root, "odd"))
    try:
        check_replication(coord.components, coord.topology, coord.group)
        out["unhashable"] = "passed"
    except ReplicationError as err:
        out["unhashable"] = str(err)

    # 5. random single-element divergences, one ulp each: every one must be caught and named.
    caught, named, trials = 0, 0, 60
    coords = {level: CheckpointCoordinator(_components(level), groups, os.path.join(root, "random"))
              for level in LEVELS}
    for trial in range(trials):
        rng = random.Random(trial)  # the same choice on every rank
        level, pattern = rng.choice(LEVELS), rng.choice(PATTERNS)
        victim, key = rng.randrange(world), rng.choice(TENSOR_KEYS)
        coord = coords[level]
        component = next(c for c in coord.components if c.sharing_pattern is pattern)
        numel = {"layer.weight": 48 * 32, "layer.bias": 32, "half": 16, "ids": 12}[key]
        index = rng.randrange(numel)
        if rank == victim:
            _perturb(component.stateful.state, key, index)
        try:
            check_replication(coord.components, coord.topology, coord.group)
        except ReplicationError as err:
            caught += 1
            text = str(err)
            named += f"'{component.key}'" in text and repr(key) in text and f"ranks [{victim}]" in text
        if rank == victim:
            component.stateful.state = _state(_copy_seed(pattern, rank))
    out["random"] = (trials, caught, named)

    # 6. values that are more than their storage's bytes (lazy views, quantizers, sparse indices, int
    # keys): consistent ones pass, and rank 3 holding the same integers under another scale is caught.
    out["beyond_bytes"] = {}
    for level in LEVELS:
        component = StateComponent(f"beyond_{level.value}", Box(_beyond_bytes(0.5)), "replicated",
                                   validate_replication=True, validation_level=level)
        coord = CheckpointCoordinator([component], groups, os.path.join(root, "beyond"))
        check_replication(coord.components, coord.topology, coord.group)
        if rank == 3:
            component.stateful.state = _beyond_bytes(0.25)
        try:
            check_replication(coord.components, coord.topology, coord.group)
            out["beyond_bytes"][level.value] = "passed"
        except ReplicationError as err:
            out["beyond_bytes"][level.value] = str(err)
    return out


def _beyond_bytes(scale: float) -> dict:
    return {"conj": torch.arange(4.0).to(torch.complex64).conj(), "neg": torch._neg_view(torch.arange(3.0)),
            "q": torch._make_per_tensor_quantized_tensor(torch.arange(4, dtype=torch.int8), scale, 0),
            "coo": torch.eye(3).to_sparse(), "csr": torch.eye(3).to_sparse_csr(), "by_id": {0: torch.ones(2)}}


@pytest.fixture(scope="module")
def outcome(ranks, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("validation"))
    return ranks(validation_scenarios, 4, root, ranks_per_node=2)


def test_consistent_state_passes_every_level(outcome):
    assert [r["consistent"] for r in outcome] == ["checkpoint-1"] * 4


@pytest.mark.parametrize("level", LEVELS, ids=lambda v: v.value)
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.value)
def test_one_ulp_on_one_rank_is_caught_and_named(outcome, pattern, level):
    key = f"{pattern.value}_{level.value}"
    results = [r[key] for r in outcome]
    assert all(status == "raised" for status, _ in results), results
    assert len({message for _, message in results}) == 1  # every rank raises the same error
    message = results[0][1]
    assert f"{pattern.name} component {key!r}" in message and "'layer.weight'" in message
    assert "ranks [3]" in message, message
    if level is ValidationLevel.FULL:
        assert "1 of 1536 elements differ, first at (2, 13)" in message


@pytest.mark.parametrize("level", LEVELS, ids=lambda v: v.value)
def test_nothing_is_committed_or_left_behind_when_validation_fails(outcome, level):
    assert all(r[f"latest-{level.value}"] is None for r in outcome)
    assert all(r[f"left-{level.value}"] == [] for r in outcome)  # the failed saves' files were removed


def test_warn_mode_logs_and_saves(outcome):
    assert [r["warn_saved"] for r in outcome] == ["checkpoint-1"] * 4
    logs = outcome[0]["warn_logs"]
    assert len(logs) == 1 and "component 'replicated_tensor'" in logs[0] and "'step'" in logs[0]
    assert "on_replication_mismatch='warn'" in logs[0]


def test_state_one_rank_cannot_hash_fails_on_every_rank(outcome):
    messages = {r["unhashable"] for r in outcome}
    assert len(messages) == 1, messages
    assert messages.pop().startswith("replication check could not read the state of ['odd'] on ranks [1]: rank 1:")


def test_every_random_one_ulp_divergence_is_caught(outcome):
    for trials, caught, named in (r["random"] for r in outcome):
        assert caught == trials, f"caught {caught} of {trials}"
        assert named == trials, f"named component, tensor and rank in {named} of {trials}"


@pytest.mark.parametrize("level", LEVELS, ids=lambda v: v.value)
def test_values_beyond_their_bytes_are_compared_with_what_makes_them(outcome, level):
    messages = {r["beyond_bytes"][level.value] for r in outcome}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "'q'" in message and "ranks [3]" in message and "'conj'" not in message, message
