"""paused_gc: the collector is off inside the block and back in its previous state after it; loads free\nwhat they read before it resumes."""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator

import pytest
import torch

from dcp_forge import CheckpointCoordinator, StateComponent
from dcp_forge.core.patterns import SharingPattern
from dcp_forge.gc_pause import paused_gc
from tests.support.statefuls import Box


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


@contextlib.contextmanager
def young_walks() -> Iterator[list[int]]:
    """Record how many objects each collection in the block found in the youngest generation."""
    walked: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            walked.append(len(gc.get_objects(generation=0)))

    gc.enable()
    gc.collect()
    gc.callbacks.append(count)
    try:
        yield walked
    finally:
        gc.callbacks.remove(count)


def _small_items(tmp_path, local_tier: str | None = None) -> tuple[Box, CheckpointCoordinator]:
    box = Box({f"t{i}": torch.full((4,), float(i)) for i in range(3000)})
    return box, CheckpointCoordinator([StateComponent("m", box, SharingPattern.REPLICATED)],
                                      output_dir=tmp_path / "out", local_tier=local_tier)


@pytest.mark.parametrize("tiered", [False, True], ids=["one-location", "tiered"])
def test_a_load_frees_what_it_read_before_the_collector_resumes(gc_state, tmp_path, tiered):
    # The reader holds objects per stored item (the checkpoint's metadata, its index rows): still held
    # when the collector resumes, the first collection walks them all and frees none of them.
    box, coord = _small_items(tmp_path, str(tmp_path / "local") if tiered else None)
    with coord:
        path = coord.save_checkpoint(checkpoint_id="ckpt")
        coord.load_checkpoint(path)  # first loads import and cache what every later load uses
        with young_walks() as walked:
            coord.load_checkpoint(path)
    assert max(walked, default=0) < len(box.state), walked  # far fewer than one object per stored item


def test_a_save_leaves_what_it_keeps_to_no_young_collection(gc_state, tmp_path):
    # A save keeps objects per item past its end (the plan cached for the next save, its metadata):
    # promoted at once to the oldest generation, no young collection walks them on the way there.
    box, coord = _small_items(tmp_path)
    coord.save_checkpoint(checkpoint_id="first")  # imports and caches what later saves use
    with young_walks() as walked:
        coord.save_checkpoint(checkpoint_id="second")
    left_young = len(gc.get_objects(generation=0)) + len(gc.get_objects(generation=1))
    assert max([*walked, left_young]) < len(box.state), (walked, left_young)


def test_cycles_made_in_the_block_are_still_collected(gc_state):
    class Node:
        pass

    gc.enable()
    with paused_gc():
        node = Node()
        node.me = node
        alive = weakref.ref(node)
        del node
    assert alive() is not None  # nothing collected it yet: the collector was off
    gc.collect()
    assert alive() is None


def test_objects_frozen_by_the_process_stay_frozen(gc_state):
    gc.enable()
    kept = [[] for _ in range(10)]  # what a server freezes before forking
    gc.freeze()
    try:
        with paused_gc():
            made = [[] for _ in range(10)]
        # still in the permanent generation, which get_objects leaves out (its size is no witness:
        # any frozen object another thread frees leaves it)
        collected = {id(o) for o in gc.get_objects()}
        assert made and not any(id(k) in collected for k in kept)
    finally:
        gc.unfreeze()
