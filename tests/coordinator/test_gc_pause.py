"""paused_gc: the collector is off inside the block and back in its previous state after it."""

from __future__ import annotations

import contextlib
import gc

import pytest

from dcp_forge.gc_pause import paused_gc


@pytest.fixture
def gc_state():
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("raises", [True, False])
def test_paused_gc_restores_the_previous_state(gc_state, enabled, raises):
    (gc.enable if enabled else gc.disable)()
    with pytest.raises(RuntimeError) if raises else contextlib.nullcontext(), paused_gc():
        assert not gc.isenabled()
        with paused_gc():  # nested: the inner block must not turn it back on
            assert not gc.isenabled()
        assert not gc.isenabled()
        if raises:
            raise RuntimeError("boom")
    assert gc.isenabled() == enabled

