"""Declarations validate themselves when built, naming the field."""

from __future__ import annotations

import pytest
import torch

from dcp_forge import SharingPattern, StateComponent, ValidationLevel
from dcp_forge.core.components import layouts_from, validate_components
from dcp_forge.core.topology import Topology


def comp(**kw):
    base = dict(key="model", stateful=torch.nn.Linear(2, 2), sharing_pattern=SharingPattern.REPLICATED)
    base.update(kw)
    return StateComponent(**base)


def test_patterns_and_levels_have_the_documented_values():
    assert {p.name: p.value for p in SharingPattern} == {
        "GLOBAL": "global", "PER_RANK": "per_rank", "REPLICATED": "replicated",
        "PER_GROUP": "per_group", "PER_NODE": "per_node"}
    assert [v.name for v in ValidationLevel] == ["NONE", "QUICK", "TENSOR", "FULL"]


def test_strings_are_accepted_for_pattern_and_level():
    c = comp(sharing_pattern="per_rank", validation_level="quick")
    assert c.sharing_pattern is SharingPattern.PER_RANK and c.validation_level is ValidationLevel.QUICK


@pytest.mark.parametrize("kwargs, field", [
    (dict(sharing_pattern="sideways"), "sharing_pattern"),
    (dict(sharing_pattern=3), "sharing_pattern"),
    (dict(sharing_pattern=SharingPattern.PER_GROUP), "process_group_name"),
    (dict(process_group_name="dp"), "process_group_name"),
    (dict(key=""), "key"),
    (dict(key="a.b"), "key"),
    (dict(key="../x"), "key"),
    (dict(key=7), "key"),
    (dict(stateful=object()), "stateful"),
    (dict(required="yes"), "required"),
    (dict(validation_level="deep"), "validation_level"),
    (dict(metadata=[]), "metadata"),
])
def test_bad_declarations_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        comp(**kwargs)


def test_duplicate_keys_are_rejected():
    with pytest.raises(ValueError, match="'model' is declared twice"):
        validate_components([comp(), comp()])


def test_layouts_from_a_mapping():
    lay = layouts_from({"rng": "per_rank", "stage": ("per_group", "pp")})
    assert lay["stage"].group_name == "pp" and lay["rng"].pattern is SharingPattern.PER_RANK
    with pytest.raises(ValueError, match="process group name"):
        layouts_from({"stage": "per_group"})


def test_topology_validates_and_derives_identity_from_ranks():
    topo = Topology(rank=1, world_size=4, node_of_rank=("b", "b", "a", "a"),
                    groups={"dp": [(2, 3), (1, 0)]})
    assert topo.node_of_rank == (0, 0, 1, 1)  # numbered by lowest rank, whatever the labels
    assert topo.groups["dp"] == ((0, 1), (2, 3))
    assert topo.group_of("dp") == (0, 1)
    assert Topology.from_json(topo.to_json(), rank=1) == topo
    with pytest.raises(ValueError, match="overlap"):
        Topology(rank=0, world_size=4, groups={"dp": [(0, 1), (1, 2)]})
    with pytest.raises(ValueError, match="rank"):
        Topology(rank=4, world_size=4)
    with pytest.raises(ValueError, match="not known"):
        topo.group_of("tp")
