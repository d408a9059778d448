"""Pausing Python's cyclic garbage collector while a save or load handles many small objects."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block with the cyclic garbage collector off, restoring its previous state after.

    A save or load of many small tensors creates a few objects per item (plans, write results,
    metadata, index records) that live until the checkpoint is committed or loaded. Each wave of such
    survivors triggers a full collection, which walks the whole process heap (torch alone holds
    hundreds of thousands of objects), so the collector's time grows with the item count while it
    finds nothing: these objects are freed by reference counting once the save ends. Cycles created
    in the block are collected by the next full collection after it. torch's ``get_state_dict`` pauses
    the collector too. Nesting and concurrent blocks leave the collector on once the outermost block that turned
    it off has ended.

    What the block leaves alive (a save's plan kept for the next save, its metadata, the caller's
    results) would be walked by the first collection after it, and again when promoted, before
    reaching the oldest generation, where it ends up anyway: the block ends by moving every tracked
    object to the oldest generation at once (``_promote_all``).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            _promote_all()
            gc.enable()


def _promote_all() -> None:
    """Move every object the collector tracks to its oldest generation, without walking any: freezing
    moves them all to the permanent generation, unfreezing moves that into the oldest one (each one
    list splice). Skipped while the process keeps objects frozen (``gc.freeze`` before a fork, so that
    children share their pages): unfreezing would release those too."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()
