"""expect_type: the declaration type check every public constructor runs, returning the value it checked;
collective_timeout_context: a collective that timed out says which rank waited, in what, for how long."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcp_forge.errors import (
    CollectiveTimeoutError,
    DeclarationTypeError,
    IncompleteSaveError,
    collective_timeout_context,
    expect_type,
)

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


def test_a_timed_out_collective_is_a_timeout_error_saying_who_waited_in_what():
    gloo = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation")
    waited = "rank 0 of 2 waited 0:00:10 in save_checkpoint"
    with pytest.raises(CollectiveTimeoutError) as caught, collective_timeout_context(lambda: waited):
        raise gloo
    assert isinstance(caught.value, TimeoutError) and caught.value.__cause__ is gloo
    assert str(caught.value).startswith("rank 0 of 2 waited 0:00:10 in save_checkpoint: a peer rank never reached "
                                        "it ([../gloo")


@pytest.mark.parametrize("error", [RuntimeError("Connection closed by peer"), ValueError("timed out"),
                                   IncompleteSaveError("timed out, but ours")])
def test_other_errors_pass_a_collective_s_context_unchanged(error):
    with pytest.raises(type(error)) as caught, collective_timeout_context(lambda: "unused"):
        raise error
    assert caught.value is error
