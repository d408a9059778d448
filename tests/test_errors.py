"""expect_type: the declaration type check every public constructor runs, returning the value it checked."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcp_forge.errors import DeclarationTypeError, expect_type

VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=4),
                   st.binary(max_size=4), st.lists(st.integers(), max_size=2),
                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
EXPECTED = st.sampled_from([int, bool, str, float, dict, Mapping, (int, str), (str, os.PathLike)])


def _accepted(value, expected) -> bool:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds and int in kinds)


@given(value=VALUES, expected=EXPECTED, optional=st.booleans())
def test_expect_type_returns_the_value_itself_or_raises_naming_it(value, expected, optional):
    if _accepted(value, expected) or (optional and value is None):
        assert expect_type("field", value, expected, optional=optional) is value
    else:
        with pytest.raises(DeclarationTypeError, match=r"^'field' of x must be <") as caught:
            expect_type("field", value, expected, optional=optional, owner=" of x")
        assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)
        assert f"(got {value!r} that is a <{type(value).__name__}>)" in str(caught.value)
        assert str(caught.value).count(" or None") == int(optional)


def test_bools_are_not_ints_unless_bool_is_expected():
    with pytest.raises(DeclarationTypeError, match="must be <int> .*got True that is a <bool>"):
        expect_type("n", True, int)
    assert expect_type("flag", True, bool) is True
