"""Who writes what when each rank computes it alone (core/set_placement.py), and the fixed-size sum
that proves the members of every replica set hold the same thing (core/agreement.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_forge.core.agreement import LANES, PRIMES, all_agree, member_terms, rank_terms
from dcp_forge.core.placement import place_on_least_loaded
from dcp_forge.core.set_placement import derive_writers, place_within_set

SETTINGS = settings(max_examples=120, deadline=None)


@SETTINGS
@given(st.integers(1, 40), st.data())
def test_placement_within_a_set_is_the_coordinator_s_least_loaded_placement(world, data):
    members = sorted(data.draw(st.sets(st.integers(0, world - 1), min_size=1)))
    base = data.draw(st.dictionaries(st.sampled_from(members), st.integers(0, 50)))
    sizes = data.draw(st.lists(st.integers(0, 60), max_size=30))
    items = [(size, (f"k{i}",), f"k{i}") for i, size in enumerate(sizes)]
    chosen, loads = place_within_set(random.Random(len(sizes)).sample(items, len(items)), members, base)
    load = [base.get(r, 0) for r in range(world)]
    reference = place_on_least_loaded([(s, o, k, members) for s, o, k in items], load)
    assert chosen == reference
    assert all(loads[r] == load[r] for r in loads) and all(load[r] == base.get(r, 0) for r in set(range(world)) - set(loads))


@SETTINGS
@given(st.integers(2, 12), st.data())
def test_the_sum_vanishes_exactly_when_every_set_agrees(world, data):
    sets = data.draw(st.lists(st.sets(st.integers(0, world - 1), min_size=2), min_size=1, max_size=4))
    sets = [tuple(sorted(s)) for s in {frozenset(s) for s in sets}]
    digests = {members: [b"same"] * len(members) for members in sets}
    damage = data.draw(st.sampled_from(["none", "differ", "missing", "twice", "other set"]))
    victim = data.draw(st.sampled_from(sets))
    position = data.draw(st.integers(0, len(victim) - 1))
    if damage == "differ":
        digests[victim][position] = b"other"
    total = [0] * LANES
    for members in sets:
        name = repr(members).encode()
        for pos, digest in enumerate(digests[members]):
            if members == victim and pos == position and damage in ("missing", "other set"):
                if damage == "other set":  # this member thinks the set is a different one
                    terms = member_terms(b"x" + name, pos, len(members), digest)
                    total = [t + x for t, x in zip(total, terms, strict=True)]
                continue
            repeats = 2 if members == victim and pos == position and damage == "twice" else 1
            for _ in range(repeats):
                total = [t + x for t, x in zip(total, rank_terms([(name, pos, len(members), digest)]), strict=True)]
    assert all_agree(total) == (damage == "none")


def test_a_set_of_one_agrees_with_itself_and_terms_stay_below_the_primes():
    assert member_terms(b"solo", 0, 1, b"anything") == [0] * LANES
    terms = member_terms(b"pair", 1, 2, b"digest")
    assert all(0 <= t < p for t, p in zip(terms, PRIMES, strict=True))
    with pytest.raises(ValueError, match="outside a set"):
        member_terms(b"pair", 2, 2, b"digest")


def test_untouched_members_cost_nothing_even_in_a_huge_world():
    chosen, loads = place_within_set([(10, (i,), i) for i in range(5)], range(10**9))
    assert chosen == {i: i for i in range(5)} and loads == {i: 10 for i in range(5)}
    assert derive_writers(10**9, [(3, (0,), "a")], [((5, 10**8), [(1, (0,), "b"), (2, (1,), "c")])]) == \
        {"a": 0, "c": 5, "b": 10**8}
