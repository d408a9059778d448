"""What happens to async saves still in flight when the job tears down without ``close()``.

A save in flight needs its background process group and the interpreter's thread pools until its
commit. Three ways a job ends pull them away, and each waits here for the live savers' saves first:

- ``dist.destroy_process_group()``: ``torch.distributed.destroy_process_group`` is wrapped (once the
  first saver exists) so that destroying the default group, or a saver's background group, first
  waits for the saves that use it. Without the wait, the background thread's next collective fails
  ("group is not registered") or, when the group is gone before the thread's first collective, DCP
  silently saves as a single process, this rank's shards alone (the writer refuses to commit that,
  see ``ForgeStorageWriter.finish``; the wait keeps the checkpoint instead of losing it). Only the
  package attribute is wrapped: torch's own internal calls and a reference taken before the first
  saver existed (``from torch.distributed import destroy_process_group``) go past it; then the save
  fails and nothing is committed.
- interpreter exit: a ``threading`` exit hook waits before ``concurrent.futures`` stops accepting work
  (after that, the writer's thread pools refuse to start and the save would fail).
- SIGTERM (torchrun's way of stopping workers): if its handler is still the default when a save
  starts on the main thread, SIGTERM while a save is in flight raises ``SystemExit(143)`` in the main
  thread instead of killing the process, so the exit hook lets the save commit or fail first; with no
  save in flight it kills the process as the default would, and a second SIGTERM always does. A
  handler the application installed is left alone.

With ``AsyncOptions(staging="overlapped")`` each wait first releases the staging (the copy finishes
and is checked before the upload may start). Upload processes (``AsyncOptions(upload="process")``)
ignore SIGINT and SIGTERM and end on their own once the training process is gone, so these waits
cover them too.

None of them raises a save's failure (it was logged when it happened): teardown must go on.
Whatever the order, a checkpoint is either committed whole or not at all: the commit itself waits
for every rank's write results (``dcp_forge.coverage``).
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (registers its exit hook before ours; see the end)
import functools
import logging
import os
import signal
import threading
import weakref
from types import TracebackType
from typing import Any, Protocol, Self

import torch.distributed as dist

logger = logging.getLogger(__name__)


class Settling(Protocol):
    """What teardown needs of a saver (``AsyncSaver``)."""

    def has_save_in_flight(self) -> bool: ...

    def uses_group(self, group: Any) -> bool: ...

    def settle_quietly(self) -> None: ...


_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


class _Closable(Protocol):
    def close(self) -> None: ...


class ClosesOnExit:
    """For classes with a ``close()``: ``with obj:`` calls it at the end of the block. If the block
    raised, that error stays the one raised, with what ``close()`` raised noted on it."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self: _Closable, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_error:  # keep the body's exception; say what close found
            exc.add_note(f"while handling it, closing the {type(self).__name__} raised: {close_error!r}")


def register(saver: Settling) -> None:
    """Track ``saver`` until ``unregister`` (or until it is garbage); installs the destroy hook."""
    _LIVE.add(saver)
    _wrap_destroy_process_group()


def unregister(saver: Settling) -> None:
    _LIVE.discard(saver)


def settle_all(group: Any = None, *, only_users: bool = False) -> None:
    """Wait for every live saver's save (with ``only_users``: those whose saves use ``group``)."""
    for saver in list(_LIVE):
        if not only_users or saver.uses_group(group):
            saver.settle_quietly()


# --- destroy_process_group ----------------------------------------------------------------------
def _wrap_destroy_process_group() -> None:
    current = dist.destroy_process_group
    if getattr(current, "_waits_for_async_saves", False):
        return

    @functools.wraps(current)
    def destroy_process_group(group: Any = None) -> None:
        settle_all(group, only_users=True)
        current(group)

    destroy_process_group._waits_for_async_saves = True  # type: ignore[attr-defined]
    dist.destroy_process_group = destroy_process_group


# --- SIGTERM ------------------------------------------------------------------------------------
def install_sigterm_handler() -> None:
    """Take over SIGTERM if nobody else did (only possible on the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    if not any(saver.has_save_in_flight() for saver in list(_LIVE)):
        os.kill(os.getpid(), signum)  # what the default action would have done
        return
    logger.warning("SIGTERM with an async save in flight: exiting once it has committed or failed "
                   "(a second SIGTERM exits at once, leaving it uncommitted)")
    raise SystemExit(128 + signum)


# --- interpreter exit ---------------------------------------------------------------------------
def _settle_at_exit() -> None:
    settle_all()


# Interpreter exit waits for the in-flight saves. It must wait *before* concurrent.futures stops
# accepting work (its exit hook makes every later ThreadPoolExecutor.submit raise "cannot schedule
# new futures after interpreter shutdown", which would fail the save's writer threads), so the hook
# goes where concurrent.futures registers its own: threading's exit hooks, which run in reverse
# order of registration, before non-daemon threads are joined and before atexit handlers (and also
# when a multiprocessing child ends). concurrent.futures.thread is imported above, so this one runs first.
_register_thread_exit_hook = getattr(threading, "_register_atexit", atexit.register)
_register_thread_exit_hook(_settle_at_exit)
