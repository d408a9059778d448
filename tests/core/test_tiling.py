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


@given(st.lists(st.integers(0, 5), max_size=3), st.data())
def test_one_whole_chunk_is_refused_unless_its_numbers_are_plain_sizes(shape, data):
    """The whole-tensor chunk every unsharded tensor has takes a short path: it must refuse what the
    full checks refuse, a size or offset that is a float or a bool equal to the right number among them."""
    odd = data.draw(st.sampled_from([float, bool, np.int64]))
    where = data.draw(st.sampled_from(["shape", "offsets", "sizes"]))
    numbers = {"shape": list(shape), "offsets": [0] * len(shape), "sizes": list(shape)}
    assert tiling_problem(tuple(numbers["shape"]), [(tuple(numbers["offsets"]), tuple(numbers["sizes"]))]) is None
    if not shape or (odd is bool and any(n > 1 for n in numbers[where])):
        return
    numbers[where][0] = odd(numbers[where][0])
    problem = tiling_problem(tuple(numbers["shape"]), [(tuple(numbers["offsets"]), tuple(numbers["sizes"]))])
    assert problem is not None, (numbers, where, odd)
