"""Staging for async saves: copy the state into buffers kept across saves, at the call or overlapped.

Staging makes the copy a background upload writes from, so that the caller may change the state
once the copy exists. Two ways, chosen by ``AsyncOptions.staging``:

- **blocking** (DCP's way): ``async_save`` returns once every tensor is copied. The caller is blocked
  for about one memory copy of the state.
- **overlapped** (DataStates-LLM's way): parameters and optimizer state only change at the next
  optimizer step, so copying them can overlap the forward and backward passes that come first.
  ``async_save`` copies at the call only what is small or not a tensor (RNG state, dataloader and
  scheduler state, step counters: things that change during the forward pass or when the next batch
  is drawn), and every storage of at least ``lazy_min_bytes`` on a thread of its own. A *declared
  mutation point* (``StagingInFlight.release``: an optimizer step pre-hook, ``wait_for_staging()``,
  ``with mutating():``, and every wait for the save) waits for what is not copied yet, then checks
  with torch's version counters that no copied tensor changed in place since the call: if one did,
  the copy may be torn and the save is refused (``UndeclaredMutationError``). The upload starts only
  after that verdict, on every rank, so nothing torn is ever written.

Both build on DCP's ``StateDictStager`` (``_torch_compat.DeferredCopyStager``): a deep copy whose
tensors land in one buffer per source storage, reused by every later save (weakly keyed: freed with
the source), views rebuilt on their staged base. DCP's stager copies a tensor as its raw storage: a
conjugate / negative view would come back without its flag (other values, silently) and a quantized
tensor without its quantizer (an internal assert later), and a sparse one fails. ``ExactStager``
re-applies the flags to the staged copy and copies quantized, sparse and nested tensors whole (at the
call); meta tensors stay as they are (a staged copy would be uninitialised memory), for the save
planner to refuse. Where torch lacks the stager, ``_CopyingStager`` deep-copies at the call.

A staging failure on one rank raises there only, and the other ranks' background saves would wait in
collectives until the process group times out: every rank agrees on success first (``agree``), at
the call for what is copied at the call, and in the background (over the saver's background group)
for the overlapped copy and the mutation check.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager, StagingOptions
from torch.distributed.tensor import DTensor

from ._torch_compat import DeferredCopyStager, flatten_state_dict, tensor_version, tree_leaves
from .collectives import failures
from .core.tensors import is_plain_tensor, math_bits, with_math_bits
from .errors import AsyncSaveError, UndeclaredMutationError
from .format.values import is_opaque_tensor, opaque_copy
from .storage import redact_url

logger = logging.getLogger(__name__)



def staging_options() -> StagingOptions:
    """DCP staging settings for this machine: synchronous (the caller may mutate the state once staging
    returns), pinned buffers only with CUDA, non-blocking device copies only with an accelerator."""
    return StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                          use_async_staging=False, use_non_blocking_copy=torch.accelerator.is_available())


def plain_buffer(nbytes: int) -> torch.UntypedStorage:
    """A staging buffer of this process: pinned with CUDA (fast device-to-host copies), else plain."""
    if torch.cuda.is_available():
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).untyped_storage()
    return torch.UntypedStorage(nbytes)


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


if DeferredCopyStager is not None:
    class ExactStager(DeferredCopyStager):
        """``DeferredCopyStager`` whose copies are exact (see the module docstring)."""

        def _offload_tensor(self, x: torch.Tensor, memo: dict, non_blocking: bool = False) -> torch.Tensor:
            if is_plain_tensor(x) and (x.device.type == "meta" or is_opaque_tensor(x)):
                staged = x.detach() if x.device.type == "meta" else opaque_copy(x)
            else:
                staged = super()._offload_tensor(x, memo, non_blocking=non_blocking)
                if is_plain_tensor(x):
                    staged = with_math_bits(staged, math_bits(x))
            memo[id(x)] = staged
            return staged

    _exact_stager: type[ExactStager] | None = ExactStager
else:  # pragma: no cover - depends on the torch release
    _exact_stager = None  # staging copies at the call (_CopyingStager)


class _CopyingStager:
    """Staging by hand, where torch has no ``StateDictStager`` to build on: a deep copy at the call
    (values exact, lazy views materialised), with no buffers kept across saves."""

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        memo = {id(leaf): opaque_copy(leaf) for leaf in tree_leaves(state_dict) if is_opaque_tensor(leaf)}
        return copy.deepcopy(state_dict, memo)

    def close(self) -> None:
        pass


def agree(error: BaseException | None, group: Any, rank: int, what: str) -> None:
    """Raise on every rank if ``error`` happened on any (so no rank starts a save the others skip).
    Collective over ``group`` (None: this process alone). The failing rank raises its own error, the
    others an AsyncSaveError naming it."""
    failed = failures(group, error)
    if error is not None:
        raise error
    if failed:
        first = min(failed)
        raise AsyncSaveError(f"{what} on rank(s) {sorted(failed)} (rank {first}: {type(failed[first]).__name__}: "
                             f"{failed[first]}); rank {rank} was fine")


class StagingInFlight:
    """The background half of one overlapped staging: copies the deferred storages on a thread of its
    own while the caller trains on.

    ``release()`` is the declared mutation point (caller's side; idempotent, any thread): it waits for
    the copy, then compares the version counter of every tensor on a copied storage with its value at
    the call. ``future`` then resolves, on every rank together (agreed over ``group``), to the staged
    state dict, or raises: the copy failed, ``after_copy`` raised (a replication check's verdict), or
    a copied tensor changed in place before the release (``UndeclaredMutationError``, logged when seen).
    """

    def __init__(self, staged: dict[str, Any], deferred: list[tuple[torch.UntypedStorage, torch.UntypedStorage]],
                 watched: list[tuple[torch.Tensor, int | None]], *, source: dict[str, Any],
                 after_copy: Callable[[], None] | None, group: Any, rank: int, label: str,
                 device_order: tuple[Any, Any] | None = None) -> None:
        self.future: Future[dict[str, Any]] = Future()
        self.copy_seconds: float | None = None  # from the call until the copy (and after_copy) finished
        self.stall_seconds = 0.0  # how long mutation points waited for it, together
        self.copied_bytes = sum(dst.nbytes() for _, dst in deferred)
        self._staged, self._deferred, self._watched, self._source = staged, deferred, watched, source
        self._after_copy, self._group, self._rank, self._label = after_copy, group, rank, label
        self._device_order = device_order  # (event recorded on the caller's stream at the call, side stream)
        self._error: BaseException | None = None
        self._mutation: UndeclaredMutationError | None = None
        self._copied = threading.Event()
        self._released = threading.Event()
        self._release_lock = threading.Lock()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="forge-staging-copy", daemon=True)
        self._thread.start()

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self) -> None:
        """Wait until the state is copied, then let the upload start (or be refused). After it returns,
        the caller may change the state."""
        if self._released.is_set():
            return
        with self._release_lock:
            if self._released.is_set():
                return
            started = time.perf_counter()
            self._copied.wait()
            self.stall_seconds += time.perf_counter() - started
            self._mutation = self._check_versions()
            if self._mutation is not None:
                logger.error("rank %d: %s", self._rank, self._mutation)
            self._released.set()

    def _check_versions(self) -> UndeclaredMutationError | None:
        changed = [tensor for tensor, version in self._watched
                   if version is not None and tensor_version(tensor) != version]
        if not changed:
            return None
        return UndeclaredMutationError(
            f"async save of {redact_url(self._label)} refused on rank {self._rank}: {_keys_of(changed, self._source)} "
            "changed in place after async_save() returned and before the overlapped staging had copied it (the "
            "copy may be torn; nothing is saved). Declare every place that changes saved tensors in place: "
            "CheckpointCoordinator.install_step_hook(optimizer) for optimizer steps, `with coordinator.mutating():` "
            "or coordinator.wait_for_staging() before any other")

    def _copy(self) -> None:
        if self._device_order is None:
            for source, buffer in self._deferred:
                buffer.copy_(source)
            return
        event, stream = self._device_order
        with stream:  # after the work the caller queued before the call, beside the work it queues now
            stream.wait_event(event)
            for source, buffer in self._deferred:
                buffer.copy_(source, non_blocking=True)
        stream.synchronize()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._copy()
        except BaseException as err:  # agreed on below, then raised by the future on every rank
            error = err
        if self._after_copy is not None:
            try:
                self._after_copy()
            except BaseException as err:
                if error is None:
                    error = err
                else:
                    error.add_note(f"after staging, {err.__class__.__name__}: {err}")
        self._deferred = []  # the sources may be freed now
        self.copy_seconds = time.perf_counter() - self._started
        self._error = error
        self._copied.set()
        self._released.wait()
        self._watched, self._source = [], {}
        try:
            agree(self._error or self._mutation, self._group, self._rank, "async save not started: staging failed")
        except BaseException as err:
            self.future.set_exception(err)
        else:
            self.future.set_result(self._staged)
        self._staged = {}


def _keys_of(changed: list[torch.Tensor], source: dict[str, Any]) -> str:
    """The state-dict keys of the changed tensors, for the error message (any tensor on one of their storages)."""
    storages = {t.untyped_storage().data_ptr() for t in changed}
    try:
        flat, _ = flatten_state_dict(source)
    except Exception:  # naming the keys is a courtesy; the refusal stands regardless
        return f"{len(changed)} tensor(s)"
    keys = [key for key, value in flat.items() for t in _local_tensors(value)
            if t.device.type == "cpu" and t.untyped_storage().data_ptr() in storages]
    if not keys:
        return f"{len(changed)} tensor(s)"
    return repr(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


class ForgeStager(AsyncStager):
    """Stages on every rank together, into buffers kept across saves; blocking or overlapped.

    ``stage`` (DCP's ``AsyncStager`` protocol, called on the caller's thread on every rank together)
    returns the staged state dict (blocking), or a Future of it (``overlap``: see the module docstring;
    ``in_flight`` is the ``StagingInFlight`` of the last call). Views and tensors sharing a storage are
    staged as one copy of the whole base storage, so a small view of a large storage costs the large
    storage's bytes; ``last_staged_bytes`` tells. The planner's row-chunks are cut later, from the
    staged tensors, so chunking costs no staging memory. ``allocate(nbytes)`` makes the buffers
    (shared memory for an upload process).
    """

    # stage() returns staged data or a future of it; DCP has nothing to synchronize afterwards.
    _synchronize_after_execute = False

    def __init__(self, group: Any = None, rank: int = 0, *, overlap: bool = False, lazy_min_bytes: int = 0,
                 allocate: Callable[[int], torch.UntypedStorage] = plain_buffer,
                 background_group: Any = None) -> None:
        self.group = group
        self.rank = rank
        self.overlap = overlap and _exact_stager is not None
        if overlap and not self.overlap:
            logger.warning("this torch has no StateDictStager to build overlapped staging on: staging at the call")
        self.lazy_min_bytes = lazy_min_bytes
        self.background_group = background_group
        self._allocate = allocate
        self._buffers: Any = self._new_buffers()
        self._stream: Any = None
        self.in_flight: StagingInFlight | None = None
        self.last_staged_bytes = 0
        self.last_staging_seconds = 0.0
        # Called once this rank's state is copied (e.g. a replication check's wait(), which must finish
        # before the caller may change the state); its error fails the save on every rank.
        self.after_staging: Callable[[], None] | None = None
        self.label = ""  # the checkpoint being staged, for messages

    def _new_buffers(self) -> Any:
        if _exact_stager is None:  # pragma: no cover - depends on the torch release
            return _CopyingStager()
        return _exact_stager(self._allocate)

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any] | Future[dict[str, Any]]:
        started = time.perf_counter()
        self.in_flight = None
        if self.overlap:
            return self._stage_overlapped(state_dict, started)
        error: BaseException | None = None
        staged: dict[str, Any] = {}
        try:
            staged = self._stage_now(state_dict)
        except Exception as err:  # agreed on below, then raised on every rank
            error = err
        error = self._run_after_staging(error)
        agree(error, self.group, self.rank, "async save not started: staging failed")
        self.last_staged_bytes = staged_bytes(staged)
        self.last_staging_seconds = time.perf_counter() - started
        return staged

    def _run_after_staging(self, error: BaseException | None) -> BaseException | None:
        if self.after_staging is None:
            return error
        try:
            self.after_staging()  # even after a staging failure: a check's thread must not outlive us
        except Exception as err:
            if error is None:
                return err
            error.add_note(f"after staging, {err.__class__.__name__}: {err}")
        return error

    def _stage_now(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self._buffers, _CopyingStager):  # pragma: no cover - the fallback, see _new_buffers
            return self._buffers.stage(state_dict)
        on_accelerator = torch.accelerator.is_available()
        staged = self._buffers.stage_deferring(state_dict, None, non_blocking=on_accelerator)
        if on_accelerator:
            torch.accelerator.synchronize()
        return staged

    def _stage_overlapped(self, state_dict: dict[str, Any], started: float) -> Future[dict[str, Any]]:
        error: BaseException | None = None
        staged: dict[str, Any] = {}
        deferred: list[tuple[torch.UntypedStorage, torch.UntypedStorage]] = []
        watched: list[tuple[torch.Tensor, int | None]] = []
        device_order = None
        try:
            staged = self._buffers.stage_deferring(state_dict, self.lazy_min_bytes)
            deferred, watched = self._buffers.deferred, self._buffers.watched
            if any(source.device.type != "cpu" for source, _ in deferred):
                device_order = self._order_after_queued_work()
        except Exception as err:  # agreed on below, then raised on every rank
            error = err
        if error is not None:
            error = self._run_after_staging(error)
        agree(error, self.group, self.rank, "async save not started: staging failed")
        self.in_flight = StagingInFlight(staged, deferred, watched, source=state_dict, after_copy=self.after_staging,
                                         group=self.background_group, rank=self.rank, label=self.label,
                                         device_order=device_order)
        self.last_staged_bytes = staged_bytes(staged)
        self.last_staging_seconds = time.perf_counter() - started
        return self.in_flight.future

    def _order_after_queued_work(self) -> tuple[Any, Any]:
        """An event on the caller's current stream (what it queued before the call) and the side stream
        the copies run on; both made on the caller's thread, as DCP's DefaultStager does."""
        if self._stream is None:
            self._stream = torch.Stream()
        event = torch.Event()
        event.record()
        return event, self._stream

    def synchronize_staging(self) -> None:
        """DCP's mutation point for a stager whose ``stage`` returns before the copy is done: wait until
        the last overlapped staging no longer reads the live state (``StagingInFlight.release``).
        Blocking staging copied everything at the call, so there is nothing to wait for."""
        if self.in_flight is not None:
            self.in_flight.release()

    def buffer_count(self) -> int:
        """How many staging buffers are kept (one per source storage staged since the last close)."""
        counter = getattr(self._buffers, "buffer_count", None)
        return counter() if counter is not None else 0

    def close(self) -> None:
        """Free the staging buffers (they are re-created by the next ``stage``)."""
        self._buffers.close()
        self._buffers = self._new_buffers()
        self.in_flight = None
