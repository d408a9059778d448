"""Async save: stage the state into buffers reused across saves, then upload and commit in the background.

Built on DCP's ``async_save`` (torch 2.13, ``state_dict_saver.py``), which already does the right
thing with our storage: its background thread runs a plain ``dcp.save`` over the staged copy, and
``ForgeStorageWriter.finish`` (index, ``.metadata``, manifest, ``_COMMITTED``) runs there on the
coordinator rank only after every rank's ``write_data`` returned, i.e. after every data file and its
directory were fsynced, and it commits only if every rank's write results cover its share of the
global plan (a rank whose process group vanished mid-save never passes for done). So an async
checkpoint is committed exactly like a sync one, and a crash at any moment before ``_COMMITTED``
leaves the previous checkpoint the latest.

``AsyncOptions`` chooses how the two halves run:

- ``staging``: "blocking" copies the state at the call; "overlapped" copies small state at the call
  and the large tensors while training goes on, until the next declared mutation point (an optimizer
  step with ``CheckpointCoordinator.install_step_hook``, ``wait_for_staging()``, ``with mutating():``,
  or any wait for the save). See ``async_staging`` for both and for the mutation check.
- ``upload``: "thread" runs the upload on a thread of the training process (DCP's THREAD executor);
  "process" in an upload process per rank, staging memory shared with it (``async_process``).

Where DCP did not fit, and what this package does instead:

- ``async_save`` without ``async_stager`` builds and frees a new ``DefaultStager`` per call (the caller
  is blocked 4-8x a memcpy while fresh memory is faulted in). ``ForgeStager`` keeps its buffers for
  the coordinator's lifetime, one per source storage, so from the second save on staging is one copy
  into already-allocated memory (also when a source storage grew in place: its buffer is replaced).
- ``StagingOptions()``'s defaults raise on a CPU-only machine (``use_non_blocking_copy`` needs an
  accelerator) and pin memory only with CUDA: staging picks per machine.
- A staging failure on one rank raises only there, and the other ranks' background saves would wait
  in collectives until the process group times out: every rank agrees on success before any
  background work starts, and every rank raises.
- DCP's future has no bound on saves in flight and forgets failures nobody asked for; its errors are
  DCP's ``CheckpointException``. ``AsyncSaver`` allows one save in flight (the next waits: the reused
  buffers must not change under a running upload, one background group serves one save at a time,
  and commits stay in save order), remembers a failure until it reached the caller (the handle's
  ``result()``/``exception()``/done-callback, else the next save or ``close()`` raises it), and
  ``AsyncSaveHandle.result()`` raises the failing rank's own typed error.
- DCP's PROCESS executor is not used (``async_process`` says why); the THREAD executor runs with a
  gloo group of our own, which keeps background collectives off the training loop's groups.

Call protocol: every rank calls ``AsyncSaver.start`` together (the first call creates the background
process group, a collective, and with ``upload="process"`` starts the upload processes), with the same
checkpoint path. ``wait_for_staging``, ``settle`` and ``close`` are local, but wait for the in-flight
save, which finishes only when every rank's upload does (and, overlapped, only once every rank
released its staging). A saver nobody closed is settled before its process group is destroyed, at
interpreter exit and on SIGTERM (teardown.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.stateful import Stateful

from . import teardown
from .async_process import UploadProcess, master_host, save_failure
from .async_staging import ForgeStager, StagingInFlight, plain_buffer, staged_bytes, staging_options
from .collectives import checkpoint_group, release_group
from .errors import AsyncSaveError
from .format.manifest import CheckpointManifest
from .planners import ForgeSavePlanner
from .storage import ForgeStorageWriter, redact_url

__all__ = ["AsyncOptions", "AsyncSaveHandle", "AsyncSaver", "ForgeStager", "StagingOptions", "release_group",
           "staged_bytes", "staging_options"]

logger = logging.getLogger(__name__)

STAGING_MODES = ("blocking", "overlapped")
UPLOAD_MODES = ("thread", "process")


@dataclasses.dataclass(frozen=True)
class AsyncOptions:
    """How ``async_save`` stages and uploads (see the module docstring).

    ``staging``: "blocking" (the call returns once the state is copied) or "overlapped" (the call
    returns once the small state is copied; storages of at least ``lazy_min_bytes`` are copied in the
    background until the next declared mutation point, which waits for what is left).
    ``upload``: "thread" (a background thread of the training process) or "process" (an upload
    process per rank, off the training process's GIL; Linux; a plain interpreter, so a script
    without the ``if __name__ == "__main__":`` guard is not run again).
    """

    staging: str = "blocking"
    upload: str = "thread"
    lazy_min_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.staging not in STAGING_MODES:
            raise ValueError(f"AsyncOptions.staging must be one of {STAGING_MODES} (got {self.staging!r})")
        if self.upload not in UPLOAD_MODES:
            raise ValueError(f"AsyncOptions.upload must be one of {UPLOAD_MODES} (got {self.upload!r})")
        if not isinstance(self.lazy_min_bytes, int) or isinstance(self.lazy_min_bytes, bool) or self.lazy_min_bytes < 0:
            raise ValueError(f"AsyncOptions.lazy_min_bytes must be an int >= 0 (got {self.lazy_min_bytes!r})")

    @property
    def overlapped(self) -> bool:
        return self.staging == "overlapped"


class AsyncSaveHandle:
    """One async save: returned once the state is staged (overlapped: once its small part is); the
    upload and commit run in the background.

    ``result(timeout)`` gives the committed checkpoint's path, or raises the failing rank's error (the
    same typed error a sync save raises). Once a failure reached the caller this way (``result()``
    raised it, ``exception()`` returned it, or a done-callback was registered, which receives it),
    the next save does not raise it again. ``done()`` never blocks. ``result()`` and ``exception()``
    are declared mutation points (they release an overlapped staging first). ``wait_for_staging()``
    returns once the state is copied (at once for blocking staging).

    Measures: ``staging_seconds``, how long the call blocked the caller; ``staged_bytes``, the staging
    memory this save used; ``copy_seconds``, from the call until the overlapped copy was done (None
    for blocking staging); ``stall_seconds``, how long mutation points waited for that copy together;
    ``upload_seconds``, from the call's return to the commit (None until done). ``manifest`` is the
    committed manifest on the coordinator rank (None on the others, and until done). ``planned_by``
    says how the save was planned once done: ``"cache"`` (the previous save's plans reused),
    ``"declarations"`` (every rank planned alone) or ``"gather"`` (DCP's exchange of plans).
    """

    def __init__(self, checkpoint_path: str, staging: StagingInFlight | None = None) -> None:
        self.checkpoint_path = checkpoint_path
        self.staging_seconds = 0.0
        self.staged_bytes = 0
        self.upload_seconds: float | None = None
        self.manifest: CheckpointManifest | None = None
        self.planned_by: str | None = None
        self._staging = staging
        self._future: Future[str] = Future()
        self._staged_at = time.perf_counter()
        self.outcome_delivered = False  # the caller has seen (or a callback receives) how it ended

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._future.exception() else "committed")
        return f"AsyncSaveHandle({redact_url(self.checkpoint_path)!r}, {state})"

    @property
    def copy_seconds(self) -> float | None:
        return None if self._staging is None else self._staging.copy_seconds

    @property
    def stall_seconds(self) -> float:
        return 0.0 if self._staging is None else self._staging.stall_seconds

    def wait_for_staging(self) -> None:
        """Return once this save no longer reads the live state: the caller may change it in place."""
        if self._staging is not None:
            self._staging.release()

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> str:
        """The committed path; raises the background error, or TimeoutError after ``timeout`` seconds."""
        self.wait_for_staging()
        try:
            return self._future.result(timeout)
        finally:
            self.outcome_delivered = self.outcome_delivered or self._future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The background error (None once committed); TimeoutError after ``timeout`` seconds."""
        self.wait_for_staging()
        try:
            return self._future.exception(timeout)
        finally:
            self.outcome_delivered = self.outcome_delivered or self._future.done()

    def add_done_callback(self, fn: Callable[[AsyncSaveHandle], None]) -> None:
        """Call ``fn(handle)`` once the save committed or failed (on the background thread; at once if done).

        ``fn`` receives a failure, so the next save does not raise it again."""
        self.outcome_delivered = True
        self._future.add_done_callback(lambda _: fn(self))


def _state_dicts(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every Stateful replaced by its ``state_dict()``, on the caller's thread (what DCP's
    ``async_save`` does before staging)."""
    return {key: value.state_dict() if isinstance(value, Stateful) else value for key, value in state.items()}


class AsyncSaver:
    """Runs one coordinator's async saves: at most one in flight, failures never lost.

    ``group`` is the caller's (coordinator's) process group for the staging agreement; the
    background group (and, with ``options.upload == "process"``, the upload processes) are created by
    the first ``start`` (collectively). ``settle_for_save`` (before each ``start`` or sync save) waits
    for the previous save and raises its failure, unless the caller already saw it on the handle.
    ``wait_for_staging`` is the declared mutation point of an overlapped staging.
    Not thread-safe, except ``wait_for_staging``: call it from one thread per rank. A saver not closed
    is settled at teardown (``dcp_forge.teardown``).
    """

    def __init__(self, group: Any = None, rank: int = 0, options: AsyncOptions | None = None, *,
                 world_size: int = 1, single_node: bool = True) -> None:
        self.group = group
        self.rank = rank
        self.options = options if options is not None else AsyncOptions()
        self.world_size = world_size
        self.single_node = single_node
        self.background_group: Any = None
        # Started now, so that its start-up overlaps the job's; joined to the others at the first save.
        self.upload_process = UploadProcess(rank, world_size) if self.options.upload == "process" else None
        self._stager: ForgeStager | None = None
        self._in_flight: AsyncSaveHandle | None = None
        self._unraised: AsyncSaveHandle | None = None  # failed, not yet raised at a save or close
        self._lock = threading.Lock()
        self.closed = False
        teardown.register(self)

    @property
    def in_flight(self) -> AsyncSaveHandle | None:
        handle = self._in_flight
        return handle if handle is not None and not handle.done() else None

    def wait_for_staging(self) -> None:
        """A declared mutation point: wait until the in-flight save no longer reads the live state (an
        overlapped staging's copy is done and checked). Local; cheap when nothing is staging."""
        handle = self._in_flight
        if handle is not None:
            handle.wait_for_staging()

    def _wait(self) -> AsyncSaveHandle | None:
        """Wait for the in-flight save; returns a failed one whose failure no save has raised yet."""
        handle = self._in_flight
        if handle is not None:
            handle.wait_for_staging()
            handle._future.exception()  # waits, unseen by the caller; _finish records a failure
            self._in_flight = None
        with self._lock:
            failed, self._unraised = self._unraised, None
        return failed

    def _raise_failure(self, failed: AsyncSaveHandle) -> None:
        error = failed._future.exception()
        raise AsyncSaveError(f"the async save of {redact_url(failed.checkpoint_path)} failed in the background "
                             f"(rank {self.rank}): {type(error).__name__}: {error}") from error

    def settle(self, raise_failure: bool = True) -> None:
        """Wait for the in-flight save (local). With ``raise_failure``, raise its failure if it has not
        reached this rank's caller (not seen on its handle, not raised at a save); without, keep it
        for the next save."""
        if not raise_failure:
            handle = self._in_flight
            if handle is not None:
                handle.wait_for_staging()
                handle._future.exception()
                self._in_flight = None
            return
        failed = self._wait()
        if failed is not None and not failed.outcome_delivered:
            self._raise_failure(failed)

    def settle_for_save(self) -> None:
        """Wait for the in-flight save before the next one, and raise its failure on every rank unless
        the caller saw it on its handle on some rank. Collective: every rank calls it together.

        A background failure reaches every rank (DCP shares it), but callers may look at it on some
        ranks only (a done-callback on rank 0, say); deciding per rank would let some ranks start the
        next save while the others raise, and wait for them in its collectives. So the ranks agree:
        seen anywhere, it cost one checkpoint and the save proceeds everywhere; seen nowhere, the save
        raises it everywhere and saves nothing, so it is never lost.
        """
        failed = self._wait()
        unseen = failed is not None and not failed.outcome_delivered
        seen = failed is not None and failed.outcome_delivered
        if self.group is not None:
            flags = torch.tensor([int(unseen), int(seen)], dtype=torch.int64)
            dist.all_reduce(flags, group=self.group)
            any_unseen, any_seen = bool(flags[0]), bool(flags[1])
        else:
            any_unseen, any_seen = unseen, seen
        if not any_unseen or any_seen:
            if failed is not None and unseen:
                logger.info("rank %d: the failure of the async save of %s was seen on another rank; saving on",
                            self.rank, redact_url(failed.checkpoint_path))
            return
        if failed is not None:
            self._raise_failure(failed)
        raise AsyncSaveError(f"the previous async save failed in the background on other ranks; rank "
                             f"{self.rank}'s part of it succeeded. Nothing was saved now")

    # --- teardown (dcp_forge.teardown) ------------------------------------------------------------
    def has_save_in_flight(self) -> bool:
        return self.in_flight is not None

    def uses_group(self, group: Any) -> bool:
        """Whether destroying ``group`` pulls a group from under this saver's saves."""
        return group is None or group is dist.GroupMember.WORLD or (
            self.background_group is not None and group is self.background_group)

    def settle_quietly(self) -> None:
        """Wait for the in-flight save, raising nothing (a failure was logged when it happened)."""
        try:
            self.settle(raise_failure=False)
        except BaseException:  # never raise during teardown (a second Ctrl-C, say)
            logger.exception("rank %d: waiting for the async save at teardown failed", self.rank)

    # --- saving ----------------------------------------------------------------------------------
    def save_group(self) -> Any:
        """The process group background saves run over (None in a single process); the first call
        creates it, a collective: every rank reaches its first async save together (call protocol)."""
        if self.group is not None and self.background_group is None:
            self.background_group = checkpoint_group()
        return self.background_group

    def _prepare(self) -> ForgeStager:
        """What the first save creates, collectively: the background group, the upload processes, the stager."""
        self.save_group()
        allocate = plain_buffer
        if self.upload_process is not None:
            if not self.upload_process.connected:
                self.upload_process.connect(self.group, master_host(self.single_node) if self.rank == 0 else "")
            allocate = self.upload_process.arenas.allocate
        if self._stager is None:
            self._stager = ForgeStager(self.group, self.rank, overlap=self.options.overlapped,
                                       lazy_min_bytes=self.options.lazy_min_bytes, allocate=allocate,
                                       background_group=self.background_group)
        return self._stager

    def start(self, state: Mapping[str, Any], checkpoint_path: str, writer: ForgeStorageWriter,
              planner: ForgeSavePlanner, *, after_staging: Callable[[], None] | None = None,
              on_committed: Callable[[AsyncSaveHandle], None] | None = None) -> AsyncSaveHandle:
        """Stage ``state`` (``{key: stateful}``) and save it to ``checkpoint_path`` in the background.

        Collective, after ``settle_for_save()``. Returns once staged (overlapped: once the small state
        is). ``after_staging()`` runs once this rank's state is copied (overlapped: in the background,
        before the next mutation point returns); if it raises (on any rank), every rank fails the save
        and nothing is saved: at the call for blocking staging, on the handle for overlapped staging.
        ``on_committed(handle)`` runs on a background thread after the commit, before ``result()``
        returns.
        """
        if self.closed:
            raise ValueError(f"async saver of rank {self.rank} is closed; create a new coordinator")
        if self._in_flight is not None or self._unraised is not None:
            raise RuntimeError("AsyncSaver.start needs the previous save settled: call settle_for_save() "
                               "on every rank first")
        teardown.install_sigterm_handler()
        stager = self._prepare()
        started = time.perf_counter()
        stager.after_staging, stager.label = after_staging, checkpoint_path
        try:
            upload = self._stage_and_submit(stager, state, writer, planner)
        finally:
            stager.after_staging = None
        handle = AsyncSaveHandle(checkpoint_path, stager.in_flight)
        handle.staging_seconds = time.perf_counter() - started
        handle.staged_bytes = stager.last_staged_bytes
        self._in_flight = handle
        upload.add_done_callback(lambda f: self._finish(handle, f, writer, planner, on_committed))
        return handle

    def _stage_and_submit(self, stager: ForgeStager, state: Mapping[str, Any], writer: ForgeStorageWriter,
                          planner: ForgeSavePlanner) -> Future:
        """Stage on the caller's thread and hand the upload to the background: a future of its outcome."""
        if self.upload_process is None:
            upload = dcp.async_save(dict(state), storage_writer=writer, planner=planner,
                                    process_group=self.background_group, async_stager=stager,
                                    no_dist=self.background_group is None,
                                    use_collectives=planner.exchange is None)
            # An AsyncSaveResponse when staging returns a future (overlapped), else the upload's future.
            return upload.upload_completion if isinstance(upload, AsyncSaveResponse) else upload
        staged = stager.stage(_state_dicts(state))
        # The writer's commit gate (a replication check's verdict) stays here: staging awaited it already.
        # So do the planner's exchange (a process group) and plan cache: the upload process plans over
        # its own group (async_process._save), with plans it keeps across saves itself.
        writer.commit_gate = None
        writer.exchange = planner.exchange = None
        planner.plan_cache = None
        return self.upload_process.submit(staged, writer, planner)

    def _finish(self, handle: AsyncSaveHandle, upload: Future, writer: ForgeStorageWriter, planner: ForgeSavePlanner,
                on_committed: Callable[[AsyncSaveHandle], None] | None) -> None:
        """Background thread: turn the upload's outcome into the handle's, bookkeeping first."""
        handle.upload_seconds = time.perf_counter() - handle._staged_at
        handle.planned_by = planner.planned_by
        error = upload.exception()
        if error is not None:  # DCP's CheckpointException is raised on every rank: the save failed everywhere
            error = save_failure(error, writer, self.background_group)
        if error is None:
            result = upload.result()
            handle.manifest = result if isinstance(result, CheckpointManifest) else writer.manifest
            if on_committed is not None:
                try:
                    on_committed(handle)
                except Exception as err:  # the checkpoint is committed; report the callback's failure
                    error = err
        if error is None:
            logger.info("rank %d: async save of %s committed (staged %.3fs, upload %.3fs)", self.rank,
                        redact_url(handle.checkpoint_path), handle.staging_seconds, handle.upload_seconds)
            handle._future.set_result(handle.checkpoint_path)
            return
        if self.background_group is not None and not _group_alive(self.background_group):
            error.add_note("the async save's process group was destroyed while the save was in flight, past "
                           "dcp_forge's wait on torch.distributed.destroy_process_group (a reference to it taken "
                           "before the coordinator was created?): call CheckpointCoordinator.close() first")
        with self._lock:
            self._unraised = handle
        logger.error("rank %d: async save of %s failed: %s: %s%s", self.rank, redact_url(handle.checkpoint_path),
                     type(error).__name__, error, "".join(f"; {note}" for note in getattr(error, "__notes__", ())))
        handle._future.set_exception(error)

    def close(self, raise_failure: bool = True) -> None:
        """Wait for the in-flight save, stop the upload process, free the staging buffers and the
        background group.

        Raises AsyncSaveError for a failure that has not reached the caller (not seen on its handle,
        not raised at a save), unless ``raise_failure`` is False: then it was only logged. Idempotent.
        """
        if self.closed:
            return
        try:
            self.settle(raise_failure=raise_failure)
        finally:
            self.closed = True
            teardown.unregister(self)
            if self.upload_process is not None:
                self.upload_process.close()
                self.upload_process = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            release_group(self.background_group)
            self.background_group = None


def _group_alive(group: Any) -> bool:
    try:
        dist.get_rank(group)
    except (ValueError, RuntimeError):  # not registered (destroyed), or no default group anymore
        return False
    return True
