"""Topology-change policies and load decisions, pure and in one process."""

from __future__ import annotations

import pytest

from dcp_forge import ComponentDeclarationError, RNGState, StateComponent, Topology, TopologyChangeError
from dcp_forge.core.keys import match_keys, storage_key
from dcp_forge.core.resharding import assign_copies, layout_changed
from dcp_forge.core.topology_policy import PolicyKind, TopologyPolicy
from dcp_forge.errors import MissingComponentError, UnexpectedComponentError
from dcp_forge.loading import LoadSelection, decide_loads
from tests.support.statefuls import Box


def saved_keys(component: str, pattern: str, topology: Topology, group: str | None = None) -> set[str]:
    c = StateComponent(component, Box({}), pattern, process_group_name=group, required=False)
    return {storage_key(c.key, c.sharing_pattern, topology, group, rank=r) for r in range(topology.world_size)}


TWO = Topology.uniform(0, 2, ranks_per_node=1, groups={"dp": [[0, 1]]})
FOUR = Topology.uniform(0, 4, ranks_per_node=2, groups={"dp": [[0, 1], [2, 3]]})


@pytest.mark.parametrize(("value", "kind"), [("error", PolicyKind.ERROR), ("RANK0", PolicyKind.RANK0),
                                             ("skip", PolicyKind.SKIP), (lambda r, s, c: 0, PolicyKind.REMAP)])
def test_policy_spellings(value, kind):
    component = StateComponent("c", Box({}), "per_rank", required=False, on_topology_change=value)
    assert component.topology_policy.kind is kind
    assert component.declaration[-1] == component.topology_policy.name


def test_defaults_are_error_for_required_and_skip_for_optional():
    assert StateComponent("a", Box({}), "per_rank").topology_policy.kind is PolicyKind.ERROR
    assert StateComponent("a", Box({}), "per_rank", required=False).topology_policy.kind is PolicyKind.SKIP


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(sharing_pattern="global", on_topology_change="rank0"), "only applies to PER_RANK"),
    (dict(sharing_pattern="per_rank", on_topology_change="skip"), "is required, so on_topology_change='skip'"),
    (dict(sharing_pattern="per_rank", on_topology_change="reseed"), "needs a stateful with a reseed"),
    (dict(sharing_pattern="per_rank", on_topology_change="first"), "must be one of 'error', 'skip', 'rank0'"),
    (dict(sharing_pattern="per_rank", on_topology_change="remap"), "must be one of"),
    (dict(sharing_pattern="per_rank", on_topology_change=3), "got 3 that is a <int>"),
])
def test_bad_policies_are_rejected_when_declared(kwargs, message):
    with pytest.raises(ComponentDeclarationError, match=message):
        StateComponent("c", Box({}), **kwargs)


def test_reseed_needs_a_reseedable_stateful():
    assert StateComponent("rng", RNGState(), "per_rank", on_topology_change="reseed").topology_policy.kind is \
        PolicyKind.RESEED
    with pytest.raises(ComponentDeclarationError):
        TopologyPolicy(PolicyKind.REMAP)  # a remap needs its mapper


def test_layout_changes_per_pattern():
    from dcp_forge import SharingPattern as P

    same_world_other_nodes = Topology.uniform(0, 4, ranks_per_node=1)
    assert not layout_changed(P.PER_RANK, None, FOUR, same_world_other_nodes)
    assert layout_changed(P.PER_NODE, None, FOUR, same_world_other_nodes)
    assert layout_changed(P.PER_GROUP, "dp", FOUR, Topology.uniform(0, 4, groups={"dp": [[0, 2], [1, 3]]}))
    assert not layout_changed(P.REPLICATED, None, FOUR, same_world_other_nodes)
    assert layout_changed(P.GLOBAL, None, TWO, FOUR)


def test_error_policy_message_names_component_and_both_topologies():
    with pytest.raises(TopologyChangeError) as info:
        assign_copies(StateComponent("sampler", Box({}), "per_group", process_group_name="dp"), TWO, FOUR)
    text = str(info.value)
    assert "PER_GROUP component 'sampler'" in text
    assert "world_size=2, nodes=2, dp=[[0, 1]]" in text and "world_size=4, nodes=2, dp=[[0, 1], [2, 3]]" in text
    assert "on_topology_change" in text


def test_rank0_node_and_group_copies():
    node = assign_copies(StateComponent("cache", Box({}), "per_node", on_topology_change="rank0"), TWO, FOUR)
    assert node.storage_keys == ("cache@node0",) * 4 and node.sources == (0,) * 4
    group = assign_copies(StateComponent("s", Box({}), "per_group", process_group_name="dp",
                                         on_topology_change="rank0"), FOUR, TWO)
    assert group.storage_keys == ("s@dp[0-1]",) * 2
    assert "every rank loads the copy saved rank 0 held (s@dp[0-1])" in group.log_line()


def test_remap_result_is_checked():
    bad = StateComponent("c", Box({}), "per_rank", on_topology_change=lambda r, s, c: r)  # 2..3 do not exist
    with pytest.raises(TopologyChangeError, match=r"returned 2 that is a <int> for new rank 2; expected a saved rank "
                                                  r"in \[0, 2\) or None"):
        assign_copies(bad, TWO, FOUR)


def test_remap_none_keeps_fresh_state_for_optional_and_raises_for_required():
    def even_only(new_rank, saved, current):
        return None if new_rank % 2 else new_rank // 2

    keys = saved_keys("c", "per_rank", TWO)
    optional = StateComponent("c", Box({}), "per_rank", required=False, on_topology_change=even_only)
    decisions = [decide_loads([optional], keys, TWO, FOUR.with_rank(r), strict=True, path="p") for r in range(4)]
    assert [dict(d.key_map).get("c") for d in decisions] == ["c@rank0", None, "c@rank1", None]
    assert "keeps its fresh state on rank 1" in decisions[1].not_loaded["c"]
    required = StateComponent("c", Box({}), "per_rank", on_topology_change=even_only)
    with pytest.raises(MissingComponentError, match="'c' is required but its policy remap"):
        decide_loads([required], keys, TWO, FOUR.with_rank(1), strict=True, path="p")


def test_unchanged_topology_loads_own_copy_whatever_the_policy():
    keys = saved_keys("c", "per_rank", FOUR)
    c = StateComponent("c", Box({}), "per_rank", on_topology_change="rank0")
    decision = decide_loads([c], keys, FOUR, FOUR.with_rank(3), strict=True, path="p")
    assert decision.key_map == {"c": "c@rank3"} and not decision.changes


def test_global_components_report_a_world_size_change():
    decision = decide_loads([StateComponent("model", Box({}), "global")], {"model"}, TWO, FOUR, strict=True, path="p")
    assert decision.key_map == {"model": "model"}
    change = decision.changes["model"]
    assert "every rank loads the one saved value (DTensor values reshard" in change.log_line()
    assert change.log_line(holds_dtensors=False).endswith(": every rank loads the one saved value as saved "
                                                          "(it holds no DTensor, nothing reshards)")
    assert "its DTensor values reshard to the current placement" in change.log_line(holds_dtensors=True)


def test_selection_validates_names_and_ignores_unselected():
    declared = ["model", "optimizer"]
    with pytest.raises(ComponentDeclarationError, match=r"not declared: \['modle'\]"):
        LoadSelection.build(declared, ["modle"], None)
    with pytest.raises(ComponentDeclarationError, match="components=\\['model'\\]"):
        LoadSelection.build(declared, "model", None)
    with pytest.raises(ComponentDeclarationError, match="which components= leaves out"):
        LoadSelection.build(declared, ["model"], {"optimizer": ["state.*"]})
    with pytest.raises(ComponentDeclarationError, match="list of glob patterns"):
        LoadSelection.build(declared, None, {"model": "layers.*"})
    comps = [StateComponent("model", Box({}), "global"), StateComponent("optimizer", Box({}), "global")]
    selection = LoadSelection.build(declared, ["model"], None)
    # The checkpoint also has a component nobody declared: with an explicit selection that is no error.
    decision = decide_loads(comps, {"model", "optimizer", "extra"}, None, Topology.single(), strict=True,
                            path="p", selection=selection)
    assert [c.key for c in decision.loading] == ["model"]
    assert decision.not_loaded == {"optimizer": "not selected (components=)",
                                   "extra": "in the checkpoint but not declared"}
    with pytest.raises(UnexpectedComponentError):
        decide_loads(comps, {"model", "optimizer", "extra"}, None, Topology.single(), strict=True, path="p")


def test_match_keys_reports_patterns_that_match_nothing():
    chosen, unmatched = match_keys(["0.*", "layers.9.*"], ["0.weight", "0.bias", "2.weight"])
    assert chosen == {"0.weight", "0.bias"} and unmatched == ("layers.9.*",)
