"""Async save: stage the state into buffers reused across saves, then upload and commit in the background.

Built on DCP's ``async_save`` (torch 2.13, ``state_dict_saver.py``), which already does the right
thing with our storage: its background thread runs a plain ``dcp.save`` over the staged copy, and
``ForgeStorageWriter.finish`` (index, ``.metadata``, manifest, ``_COMMITTED``) runs there on the
coordinator rank only after every rank's ``write_data`` returned, i.e. after every data file and its
directory were fsynced, and it commits only if every rank's write results cover its share of the
global plan (a rank whose process group vanished mid-save never passes for done). So an async
checkpoint is committed exactly like a sync one, and a crash at any moment before ``_COMMITTED``
leaves the previous checkpoint the latest.

Where DCP did not fit, and what this module does instead:

- ``async_save`` without ``async_stager`` builds and frees a new ``DefaultStager`` per call (the caller
  is blocked 4-8x a memcpy while fresh memory is faulted in). ``ForgeStager`` keeps one
  ``DefaultStager`` for the coordinator's lifetime: its ``StateDictStager`` caches one staging buffer
  per source storage (weakly keyed, freed with the source), so from the second save on staging is
  one copy into already-allocated memory.
- ``StagingOptions()``'s defaults raise on a CPU-only machine (``use_non_blocking_copy`` needs an
  accelerator) and pin memory only with CUDA: ``staging_options()`` picks per machine.
- DCP's ``StateDictStager`` copies a tensor as its raw storage: a conjugate / negative view comes
  back without its flag (other values, silently) and a quantized tensor without its quantizer (an
  internal assert later), and a sparse one fails. dcp_forge's exact stager re-applies the flags to the
  staged copy and copies quantized, sparse and nested tensors whole; meta tensors stay as they are (a
  staged copy would be uninitialised memory), for the save planner to refuse.
- DCP's stager raises ``AssertionError`` ("Cached storage size does not match") when a source storage
  grew in place (``Tensor.resize_``) since the last save: ``ForgeStager`` then drops its buffers and
  stages again with a fresh stager.
- A staging failure on one rank raises only there, and the other ranks' background saves would wait
  in collectives until the process group times out: ``ForgeStager.stage`` agrees on success across
  ranks before any background work starts, and every rank raises.
- DCP's future has no bound on saves in flight and forgets failures nobody asked for; its errors are
  DCP's ``CheckpointException``. ``AsyncSaver`` allows one save in flight (the next waits: the reused
  buffers must not change under a running upload, one background group serves one save at a time,
  and commits stay in save order), remembers a failure until it reached the caller (the handle's
  ``result()``/``exception()``/done-callback, else the next save or ``close()`` raises it), and
  ``AsyncSaveHandle.result()`` raises the failing rank's own typed error.
- DCP's PROCESS executor is not used: it re-imports ``__main__`` in a daemon, sets up a process group
  of its own, and would need the planner's declarations pickled across; the THREAD executor with a
  gloo group of our own keeps background collectives off the training loop's groups.

Call protocol: every rank calls ``AsyncSaver.start`` together (the first call creates the background
process group, a collective), with the same checkpoint path. ``settle``/``close`` are local, but wait
for the in-flight save, which finishes only when every rank's upload does. A saver nobody closed is
settled before its process group is destroyed, at interpreter exit and on SIGTERM (teardown.py).
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.tensor import DTensor

from . import teardown
from ._torch_compat import StateDictStager, install_state_dict_stager, tree_leaves
from .collectives import release_group
from .core.tensors import is_plain_tensor, math_bits, with_math_bits
from .errors import AsyncSaveError, first_rank_failure
from .format.manifest import CheckpointManifest
from .format.values import is_opaque_tensor, opaque_copy
from .planners import ForgeSavePlanner
from .storage import ForgeStorageWriter, redact_url

logger = logging.getLogger(__name__)

# DCP's wording for a cached staging buffer whose source storage changed size (see module docstring).
_RESIZED_STORAGE_MESSAGE = "Cached storage size does not match"


def staging_options() -> StagingOptions:
    """Staging settings for this machine: synchronous (the caller may mutate the state once staging
    returns), pinned buffers only with CUDA, non-blocking device copies only with an accelerator."""
    return StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                          use_async_staging=False, use_non_blocking_copy=torch.accelerator.is_available())


@functools.cache
def _exact_state_dict_stager() -> type | None:
    """DCP's ``StateDictStager`` (one cached CPU buffer per source storage), made exact: it stages a
    tensor as its raw storage, so lazy-view flags are re-applied to the staged copy, and opaque
    tensors (quantized, sparse, nested) are copied whole. None where this torch lacks the class."""
    if StateDictStager is None:
        return None

    class ExactStateDictStager(StateDictStager):
        def _offload_tensor(self, x: torch.Tensor, memo: dict, non_blocking: bool = False) -> torch.Tensor:
            if is_plain_tensor(x) and (x.device.type == "meta" or is_opaque_tensor(x)):
                staged = x.detach() if x.device.type == "meta" else opaque_copy(x)
            else:
                staged = super()._offload_tensor(x, memo, non_blocking=non_blocking)
                if is_plain_tensor(x):
                    staged = with_math_bits(staged, math_bits(x))
            memo[id(x)] = staged
            return staged

    return ExactStateDictStager


class _CopyingStager:
    """Staging by hand, where torch's ``DefaultStager`` cannot stage through an exact
    ``StateDictStager``: a deep copy (values exact, lazy views materialised), with no buffers kept
    across saves."""

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        memo = {id(leaf): opaque_copy(leaf) for leaf in tree_leaves(state_dict) if is_opaque_tensor(leaf)}
        return copy.deepcopy(state_dict, memo)

    def close(self) -> None:
        pass


def exact_stager(options: StagingOptions) -> DefaultStager | _CopyingStager:
    """A stager whose copies are exact (see ``_exact_state_dict_stager``): DCP's ``DefaultStager``
    staging through the exact ``StateDictStager`` where this torch allows, else ``_CopyingStager``."""
    stager = DefaultStager(options)
    exact = _exact_state_dict_stager()
    if exact is not None and install_state_dict_stager(
            stager, exact(pin_memory=options.use_pinned_memory, share_memory=options.use_shared_memory)):
        return stager
    stager.close()
    return _CopyingStager()


def _local_tensors(value: Any) -> list[torch.Tensor]:
    """The plain tensors holding a value's local data (a DTensor's local shard, a ShardedTensor's shards)."""
    if isinstance(value, DTensor):
        return [value.to_local()]
    if hasattr(value, "local_shards"):
        return [shard.tensor for shard in value.local_shards()]
    return [value] if isinstance(value, torch.Tensor) else []


def staged_bytes(staged: Any) -> int:
    """Bytes of the distinct storages behind the tensors of a staged state dict (views count once)."""
    storages = {}
    for leaf in tree_leaves(staged):
        for tensor in _local_tensors(leaf):
            if tensor.device.type == "cpu" and tensor.layout == torch.strided and not tensor.is_nested:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class ForgeStager(AsyncStager):
    """DCP's ``DefaultStager``, kept across saves, that every rank agrees succeeded.

    ``stage`` (DCP's ``AsyncStager`` protocol; called by ``dcp.async_save`` on the caller's thread, on
    every rank together) returns a staged copy independent of later in-place changes to the state.
    Views and tensors sharing a storage are staged as one copy of the whole base storage (DCP's
    ``StateDictStager`` dedups by storage and rebuilds each view with its offset and strides), so a
    small view of a large storage costs the large storage's bytes; ``last_staged_bytes`` tells. The
    planner's row-chunks are cut later, from the staged tensors (``exact_storage`` slices the staging
    buffer without copying), so chunking costs no staging memory.
    """

    # stage() returns fully staged data; nothing to synchronize after DCP starts the upload.
    _synchronize_after_execute = False

    def __init__(self, group: Any = None, rank: int = 0, options: StagingOptions | None = None) -> None:
        self.options = options if options is not None else staging_options()
        self.group = group
        self.rank = rank
        self._stager = exact_stager(self.options)
        self.last_staged_bytes = 0
        self.last_staging_seconds = 0.0
        # Called once this rank staged, before the agreement (e.g. a replication check's wait(), which
        # must finish before the caller may change the state); its error fails the save on every rank.
        self.after_staging: Callable[[], None] | None = None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        error: BaseException | None = None
        staged: dict[str, Any] = {}
        try:
            staged = self._stage_reusing_buffers(state_dict)
        except Exception as err:  # agreed on below, then raised on every rank
            error = err
        if self.after_staging is not None:
            try:
                self.after_staging()  # even after a staging failure: a check's thread must not outlive us
            except Exception as err:
                if error is None:
                    error = err
                else:
                    error.add_note(f"after staging, {err.__class__.__name__}: {err}")
        self._agree(error)
        self.last_staged_bytes = staged_bytes(staged)
        self.last_staging_seconds = time.perf_counter() - started
        return staged

    def _stage_reusing_buffers(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._stager.stage(state_dict)
        except AssertionError as err:
            if _RESIZED_STORAGE_MESSAGE not in str(err):
                raise
            logger.info("rank %d: a staged tensor's storage changed size; re-allocating staging buffers",
                        self.rank)
            self._stager.close()
            self._stager = exact_stager(self.options)
            return self._stager.stage(state_dict)

    def _agree(self, error: BaseException | None) -> None:
        """Raise on every rank if staging failed on any (so no rank starts a save the others skip)."""
        if self.group is None:
            if error is not None:
                raise error
            return
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
        dist.all_reduce(flag, group=self.group)
        if int(flag.item()) == 0:
            return
        reports: list[Any] = [None] * dist.get_world_size(self.group)
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(reports, mine, group=self.group)
        if error is not None:
            raise error
        failed = {rank: text for rank, text in enumerate(reports) if text is not None}
        raise AsyncSaveError(f"async save not started: staging failed on rank(s) {sorted(failed)} "
                             f"(rank {min(failed)}: {failed[min(failed)]}); rank {self.rank} staged fine")

    def close(self) -> None:
        """Free the staging buffers (they are re-created by the next ``stage``)."""
        self._stager.close()
        self._stager = exact_stager(self.options)


class AsyncSaveHandle:
    """One async save: returned once the state is staged; the upload and commit run in the background.

    ``result(timeout)`` gives the committed checkpoint's path, or raises the failing rank's error (the
    same typed error a sync save raises). Once a failure reached the caller this way (``result()``
    raised it, ``exception()`` returned it, or a done-callback was registered, which receives it),
    the next save does not raise it again. ``done()`` never blocks. ``staging_seconds`` is how long the
    caller was blocked staging, ``staged_bytes`` the staging memory this save used, ``upload_seconds``
    the time from staged to committed (None until done). ``manifest`` is the committed manifest on the
    coordinator rank (None on the others, and until done).
    """

    def __init__(self, checkpoint_path: str) -> None:
        self.checkpoint_path = checkpoint_path
        self.staging_seconds = 0.0
        self.staged_bytes = 0
        self.upload_seconds: float | None = None
        self.manifest: CheckpointManifest | None = None
        self._future: Future[str] = Future()
        self._staged_at = time.perf_counter()
        self.outcome_delivered = False  # the caller has seen (or a callback receives) how it ended

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._future.exception() else "committed")
        return f"AsyncSaveHandle({redact_url(self.checkpoint_path)!r}, {state})"

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> str:
        """The committed path; raises the background error, or TimeoutError after ``timeout`` seconds."""
        try:
            return self._future.result(timeout)
        finally:
            self.outcome_delivered = self.outcome_delivered or self._future.done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The background error (None once committed); TimeoutError after ``timeout`` seconds."""
        try:
            return self._future.exception(timeout)
        finally:
            self.outcome_delivered = self.outcome_delivered or self._future.done()

    def add_done_callback(self, fn: Callable[[AsyncSaveHandle], None]) -> None:
        """Call ``fn(handle)`` once the save committed or failed (on the background thread; at once if done).

        ``fn`` receives a failure, so the next save does not raise it again."""
        self.outcome_delivered = True
        self._future.add_done_callback(lambda _: fn(self))


class AsyncSaver:
    """Runs one coordinator's async saves: at most one in flight, failures never lost.

    ``group`` is the caller's (coordinator's) process group for the staging agreement; the
    background group is created by the first ``start`` (collectively). ``settle_for_save`` (before each
    ``start`` or sync save) waits for the previous save and raises its failure, unless the caller
    already saw it on the handle.
    Not thread-safe: call it from one thread per rank. A saver not closed is settled at teardown
    (``dcp_forge.teardown``).
    """

    def __init__(self, group: Any = None, rank: int = 0) -> None:
        self.group = group
        self.rank = rank
        self.background_group: Any = None
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

    def _wait(self) -> AsyncSaveHandle | None:
        """Wait for the in-flight save; returns a failed one whose failure no save has raised yet."""
        handle = self._in_flight
        if handle is not None:
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
            if unseen:
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

    def save_group(self) -> Any:
        """The process group background saves run over (None in a single process); the first call
        creates it, a collective: every rank reaches its first async save together (call protocol)."""
        if self.group is not None and self.background_group is None:
            self.background_group = dist.new_group(backend="gloo")
        return self.background_group

    def start(self, state: Mapping[str, Any], checkpoint_path: str, writer: ForgeStorageWriter,
              planner: ForgeSavePlanner, *, after_staging: Callable[[], None] | None = None,
              on_committed: Callable[[AsyncSaveHandle], None] | None = None) -> AsyncSaveHandle:
        """Stage ``state`` (``{key: stateful}``) and save it to ``checkpoint_path`` in the background.

        Collective, after ``settle_for_save()``. Returns once staged. ``after_staging()`` runs on the
        caller's thread once this rank staged; if it raises (on any rank), every rank raises and nothing
        is saved.
        ``on_committed(handle)`` runs on the background thread after the commit, before ``result()``
        returns.
        """
        if self.closed:
            raise ValueError(f"async saver of rank {self.rank} is closed; create a new coordinator")
        if self._in_flight is not None or self._unraised is not None:
            raise RuntimeError("AsyncSaver.start needs the previous save settled: call settle_for_save() "
                               "on every rank first")
        teardown.install_sigterm_handler()
        background_group = self.save_group()
        if self._stager is None:
            self._stager = ForgeStager(self.group, self.rank)
        started = time.perf_counter()
        self._stager.after_staging = after_staging
        try:
            upload = dcp.async_save(dict(state), storage_writer=writer, planner=planner,
                                    process_group=background_group, async_stager=self._stager,
                                    no_dist=background_group is None,
                                    use_collectives=planner.exchange is None)
        finally:
            self._stager.after_staging = None
        handle = AsyncSaveHandle(checkpoint_path)
        handle.staging_seconds = time.perf_counter() - started
        handle.staged_bytes = self._stager.last_staged_bytes
        self._in_flight = handle
        upload.add_done_callback(lambda f: self._finish(handle, f, writer, on_committed))
        return handle

    def _finish(self, handle: AsyncSaveHandle, upload: Future, writer: ForgeStorageWriter,
                on_committed: Callable[[AsyncSaveHandle], None] | None) -> None:
        """Background thread: turn DCP's outcome into the handle's, bookkeeping first."""
        handle.upload_seconds = time.perf_counter() - handle._staged_at
        error = upload.exception()
        if isinstance(error, CheckpointException):  # raised on every rank: the save failed everywhere
            error = first_rank_failure(error) or error
            writer.discard_failed_save(error, self.background_group)
        if error is None:
            handle.manifest = writer.manifest
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
        """Wait for the in-flight save, free the staging buffers and the background group.

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
