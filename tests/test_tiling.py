"""``tiling_problem``: the one test of "the stored chunks tile this tensor exactly once" that loading,
``verify`` and ``inspect`` share, against a brute-force count of every element."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings

from dcp_forge.core.tensors import tiling_problem
from tests.support.strategies import tilings


def _exactly_once(shape, boxes) -> bool:
    counts = np.zeros(shape, dtype=np.int64)
    for offsets, sizes in boxes:
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            return False
        counts[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
    return bool((counts == 1).all())


@settings(max_examples=400, deadline=None)
@given(tilings())
def test_tiling_problem_agrees_with_counting_every_element(case):
    shape, boxes = case
    problem = tiling_problem(shape, boxes)
    assert (problem is None) == _exactly_once(shape, boxes), (shape, boxes, problem)


def test_tiling_problems_say_what_is_wrong():
    assert tiling_problem((4, 4), [((0, 0), (2, 4)), ((2, 0), (2, 4))]) is None
    assert tiling_problem((4, 4), [((0, 0), (2, 4))]) == "its chunks cover 8 of its 16 elements"
    assert "overlap" in tiling_problem((4, 4), [((0, 0), (3, 4)), ((2, 0), (2, 4))])
    assert "lies outside its shape [4]" in tiling_problem((4,), [((2,), (3,))])
    assert "lies outside" in tiling_problem((4,), [((-1,), (5,))])
    assert "not a list of sizes" in tiling_problem((4.0,), [((0,), (4,))])
    assert tiling_problem((), [((), ())]) is None and "overlap" in tiling_problem((), [((), ()), ((), ())])
