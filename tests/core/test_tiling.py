"""``tiling_problem``: the one test of "the stored chunks tile this tensor exactly once" that loading,
``verify`` and ``inspect`` share, against a brute-force count of every element."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_forge.core.tensors import tiling_problem
from tests.support.strategies import tilings


def _tiled(shape, boxes, whole: bool) -> bool:
    """Every element in exactly one box (``whole``) or in at most one, no box reaching outside."""
    counts = np.zeros(shape, dtype=np.int64)
    for offsets, sizes in boxes:
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            return False
        counts[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
    return bool((counts == 1).all()) if whole else bool((counts <= 1).all())


@settings(max_examples=400, deadline=None)
@given(tilings(), st.booleans())
def test_tiling_problem_agrees_with_counting_every_element(case, whole):
    shape, boxes = case
    problem = tiling_problem(shape, boxes, whole=whole)
    assert (problem is None) == _tiled(shape, boxes, whole), (shape, boxes, whole, problem)


def test_tiling_problems_say_what_is_wrong():
    assert tiling_problem((4, 4), [((0, 0), (2, 4)), ((2, 0), (2, 4))]) is None
    assert tiling_problem((4, 4), [((0, 0), (2, 4))]) == "its chunks cover 8 of its 16 elements"
    assert "overlap" in tiling_problem((4, 4), [((0, 0), (3, 4)), ((2, 0), (2, 4))])
    assert "lies outside its shape [4]" in tiling_problem((4,), [((2,), (3,))])
    assert "lies outside" in tiling_problem((4,), [((-1,), (5,))])
    assert "not a list of sizes" in tiling_problem((4.0,), [((0,), (4,))])
    assert tiling_problem((), [((), ())]) is None and "overlap" in tiling_problem((), [((), ()), ((), ())])
    assert tiling_problem((4, 4), [((0, 0), (2, 4))], whole=False) is None  # a copy of part of it
    assert "overlap" in tiling_problem((4, 4), [((0, 0), (3, 4)), ((2, 0), (1, 4))], whole=False)
