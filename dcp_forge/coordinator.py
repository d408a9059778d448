"""CheckpointCoordinator: save and load declared state components through DCP.

Call protocol: every rank constructs its coordinator at the same point of the program (construction
is collective: it gathers the topology and creates the coordinator's own gloo process group, and
creating process groups must happen in the same order on every rank). Afterwards every rank calls
``save_checkpoint`` / ``async_save`` / ``load_checkpoint`` together, with the same arguments. At most one
async save is in flight: the next save (sync or async) waits for it, and a load waits for it too.
``close()`` (or leaving a ``with`` block) waits for it and frees what the coordinator holds; call it
before ``dist.destroy_process_group()``. A forgotten ``close()`` loses nothing: destroying the process
group, interpreter exit and SIGTERM first wait for the save in flight (``dcp_forge.teardown``), and a
save commits only once every rank's write results cover the whole plan.

Overlapped staging (``async_options=AsyncOptions(staging="overlapped")``) returns from ``async_save``
before the large tensors are copied; every place that changes saved tensors in place must then be
declared: ``install_step_hook(optimizer)`` makes each optimizer step wait for the copy,
``wait_for_staging()`` / ``with mutating():`` do the same anywhere else. Both are local and cost
nothing when no copy is running.

A background failure is raised by its handle (``result()``, ``exception()``, a done-callback). Once
the caller has seen it there on some rank, the next save proceeds; a failure nobody looked at is
raised by the next save on every rank (which then saves nothing), by ``wait()`` or by ``close()``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from . import collectives
from ._torch_compat import single_process_dcp
from .async_save import AsyncOptions, AsyncSaveHandle, AsyncSaver, release_group
from .core.components import StateComponent, group_names, validate_components
from .core.keys import top_level_key
from .core.placement import ChunkPolicy
from .core.topology import Topology, gather_topology
from .errors import (
    CheckpointNotFoundError,
    ComponentDeclarationError,
    DeclarationTypeError,
    IntegrityError,
    TopologyChangeWarning,
    describe_type,
    expect_type,
    first_rank_failure,
)
from .format.manifest import CheckpointManifest
from .format.names import MANIFEST_FILE, validate_checkpoint_id
from .format.tier_record import LOCAL
from .format.values import saved_forms
from .gc_pause import paused_gc
from .loading import LoadResult, LoadSelection, decide_loads
from .planners import ForgeLoadPlanner, ForgeSavePlanner, PlanCache
from .rank_exchange import RankExchange
from .replication import ReplicationCheck, needs_replication_check, start_replication_check
from .statefuls import prepare_for_load
from .storage import (
    ForgeStorageReader,
    ForgeStorageWriter,
    ReadOnceStorageReader,
    join_url,
    latest_checkpoint,
    open_backend,
    read_once_by_default,
    redact_url,
)
from .teardown import ClosesOnExit
from .tiers.policy import LocalTier
from .tiers.recovery import Source
from .tiers.tiered import TieredStorage

logger = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _rank_errors(failed_save: ForgeStorageWriter | None = None, group: Any = None) -> Iterator[None]:
    """Turn DCP's CheckpointException into the failing rank's own (typed) error, on every rank.

    DCP raises it on every rank once each rank's step returned, so the ranks agree the step failed
    and nothing writes any more: ``failed_save`` (the writer of a save over ``group``) then removes
    what it wrote.
    """
    try:
        yield
    except CheckpointException as exc:
        original = first_rank_failure(exc)
        if failed_save is not None:
            failed_save.discard_failed_save(original or exc, group)
        if original is None:
            raise
        raise original from exc


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _collective(method: Callable[Concatenate[CheckpointCoordinator, _P], _R]
                ) -> Callable[Concatenate[CheckpointCoordinator, _P], _R]:
    """A public method whose collectives (ours and DCP's, over the coordinator's group), if one times
    out waiting for a peer rank, raise CollectiveTimeoutError naming the method, the rank and the wait."""
    @functools.wraps(method)
    def call(self: CheckpointCoordinator, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with collectives.waiting_in(self.group, f"{method.__name__} (its collectives over dcp_forge's process group)"):
            return method(self, *args, **kwargs)
    return call


class CheckpointCoordinator(ClosesOnExit):
    """Saves and loads ``state_components`` under ``output_dir`` (a local path or fsspec URL).

    ``process_groups`` names the groups PER_GROUP components refer to (``ProcessGroup`` objects,
    e.g. from ``DeviceMesh.get_group``). ``node`` overrides this rank's node identity (default:
    torchrun's LOCAL_RANK layout, else the host name). ``async_options`` chooses how ``async_save``
    stages (at the call, or overlapped with training) and where it uploads (a thread, or an upload
    process per rank); see ``AsyncOptions``.

    ``local_tier`` (a ``LocalTier``, or just its node-local directory): every save commits there first
    and returns, then drains to ``output_dir`` in the background with a commit of its own; a load takes
    the newest checkpoint committed and intact in either tier, the local one first (docs/TIERS.md).
    """

    def __init__(self, state_components: Sequence[StateComponent],
                 process_groups: Mapping[str, Any] | None = None, output_dir: str | os.PathLike = ".",
                 storage_options: Mapping[str, Any] | None = None, *, node: int | str | None = None,
                 thread_count: int = 2, chunk_policy: ChunkPolicy = ChunkPolicy(),
                 verify_checksums: bool = True, training_args_hash: str | None = None,
                 local_tier: LocalTier | str | os.PathLike | None = None,
                 async_options: AsyncOptions | None = None) -> None:
        _check_arguments(state_components, process_groups, output_dir, storage_options, node, thread_count,
                         chunk_policy, verify_checksums, training_args_hash)
        expect_type("local_tier", local_tier, (LocalTier, str, os.PathLike), optional=True)
        expect_type("async_options", async_options, AsyncOptions, optional=True)
        if local_tier is not None and not isinstance(local_tier, LocalTier):
            local_tier = LocalTier(os.fspath(local_tier))
        self.components = validate_components(state_components)
        self.process_groups = dict(process_groups or {})
        missing = sorted(group_names(self.components) - set(self.process_groups))
        if missing:
            users = [c.key for c in self.components if c.process_group_name in missing]
            raise ComponentDeclarationError(
                f"components {users} are PER_GROUP over {missing}, which process_groups does not name "
                f"(it has {sorted(self.process_groups) or 'none'}); return them from get_process_groups()")
        self.output_dir = os.fspath(output_dir)
        self.storage_options = dict(storage_options or {})
        self.thread_count = thread_count
        self.chunk_policy = chunk_policy
        self.verify_checksums = verify_checksums
        self.training_args_hash = training_args_hash
        # A group of its own keeps checkpoint collectives off the training loop's (possibly NCCL) group.
        self.group = collectives.checkpoint_group() if _distributed() else None
        self.topology: Topology = gather_topology(self.process_groups, node=node, group=self.group)
        self._check_declarations_agree()
        # Replication checks run beside a save, on a thread and group of their own (replication.py).
        self._validation_group = (collectives.checkpoint_group()
                                  if _distributed() and needs_replication_check(self.components) else None)
        self.last_manifest: CheckpointManifest | None = None
        self.async_options = async_options if async_options is not None else AsyncOptions()
        self._async_saves = AsyncSaver(self.group, self.topology.rank, self.async_options,
                                       world_size=self.topology.world_size, single_node=self.topology.num_nodes == 1)
        self.tiers = (TieredStorage(local_tier, self.topology, self.group, self.output_dir, self.storage_options,
                                    thread_count) if local_tier is not None else None)
        # Every rank plans its saves by itself (planners/derived.py) and reuses a plan while the state's
        # structure is unchanged: this coordinator's plans, never shared with another's.
        self.plan_cache = PlanCache()

    # --- helpers ------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.topology.rank

    def _all_gather(self, obj: Any) -> list[Any]:
        return collectives.all_gather(self.group, obj)

    def _check_declarations_agree(self) -> None:
        mine = [c.declaration for c in self.components]
        for rank, theirs in enumerate(self._all_gather(mine)):
            if theirs != mine:
                diff = sorted(set(map(str, theirs)) ^ set(map(str, mine)))
                raise ComponentDeclarationError(
                    f"state components differ between rank {self.rank} and rank {rank}: every rank must "
                    f"declare the same keys, patterns, groups and required flags (differences: {diff[:6]})")

    def run_on_coordinator(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and give its result (or its exception) to every rank.

        For storage housekeeping every rank must agree on (listing, retention, discarding leftovers):
        one rank asks the store, so ranks never act on listings taken at different moments.
        Collective: every rank calls it.
        """
        return collectives.run_on(self.group, 0, fn)

    def _on_every_rank(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on every rank; if it raised anywhere, raise the lowest failing rank's error everywhere.

        For decisions taken before a collective: a rank raising alone would leave the others waiting
        in the collective for it.
        """
        return collectives.on_every_rank(self.group, fn)

    def checkpoint_path(self, checkpoint_id: str) -> str:
        return join_url(self.output_dir, validate_checkpoint_id(checkpoint_id))

    # --- save ---------------------------------------------------------------------------------
    def _prepare_save(self, checkpoint_path: str | os.PathLike | None, checkpoint_id: str | None,
                      validate: bool, extra: Mapping[str, Any] | None, drain: bool | None, *,
                      background: bool = False
                      ) -> tuple[str, ForgeStorageWriter, ForgeSavePlanner, ReplicationCheck | None,
                                 Callable[[], None] | None]:
        """What a sync and an async save share: the path, the replication check, writer and planner, and
        (with a local tier) what commits the save once DCP's part is done. ``background``: the save
        runs on the async saver's thread and process group."""
        # Collective: the previous async save commits first; a failure nobody saw raises here, on every rank.
        self._async_saves.settle_for_save()
        expect_type("validate", validate, bool)
        expect_type("drain", drain, bool, optional=True)
        _check_extra(extra)
        if (checkpoint_path is None) == (checkpoint_id is None):
            raise ComponentDeclarationError("pass exactly one of checkpoint_path or checkpoint_id")
        if self.tiers is not None:
            tier_id = self._tiered_id(checkpoint_path, checkpoint_id)
            path = self.checkpoint_path(tier_id)
            # Collective: a drain failure nobody saw raises here; every node claims its copy.
            save_id, due = self.tiers.begin_save(self.group, tier_id, drain)
        elif drain is not None:
            raise ComponentDeclarationError("'drain' needs a coordinator with a local_tier")
        elif checkpoint_id is not None:
            path = self.checkpoint_path(checkpoint_id)
        else:
            assert checkpoint_path is not None  # exactly one of the two was given (checked above)
            path = os.fspath(checkpoint_path)
        finish: Callable[[], None] | None = None
        # The check hashes while DCP plans and writes (sync) or stages (async); the coordinator rank
        # waits for its verdict before committing, and every rank waits for it before returning.
        check = start_replication_check(self.components, self.topology, self._validation_group) if validate else None
        gate = check.wait if check is not None and self.rank == 0 else None
        # The planner's and the writer's own collectives (dcp.save runs with use_collectives=False).
        exchange = RankExchange(self._async_saves.save_group() if background else self.group)
        if self.tiers is not None:
            tiers = self.tiers
            local_writer = tiers.writer(tier_id, save_id, extra=extra, training_args_hash=self.training_args_hash,
                                        commit_gate=gate, exchange=exchange)
            writer: ForgeStorageWriter = local_writer

            def finish() -> None:
                tiers.finish_save(local_writer, tier_id, due)
        else:
            writer = ForgeStorageWriter(path, self.storage_options, thread_count=self.thread_count, extra=extra,
                                        training_args_hash=self.training_args_hash, commit_gate=gate,
                                        exchange=exchange)
        planner = ForgeSavePlanner(self.components, self.topology, chunk_policy=self.chunk_policy,
                                   exchange=exchange, plan_cache=self.plan_cache)
        return path, writer, planner, check, finish

    def _tiered_id(self, checkpoint_path: str | os.PathLike | None, checkpoint_id: str | None) -> str:
        """A tiered save is named by its checkpoint id (a path must be ``output_dir/<id>``)."""
        if checkpoint_id is not None:
            return validate_checkpoint_id(checkpoint_id)
        assert checkpoint_path is not None  # the caller passes exactly one of the two
        found = self._id_in_tiers(checkpoint_path)
        if found is None:
            raise ComponentDeclarationError(
                f"a coordinator with a local_tier saves into output_dir/<checkpoint_id>: checkpoint_path "
                f"{redact_url(os.fspath(checkpoint_path))} is not under {redact_url(self.output_dir)}; pass checkpoint_id")
        return found

    def _id_in_tiers(self, path: str | os.PathLike | None) -> str | None:
        """The checkpoint id ``path`` names in output_dir or this node's local tier (None: elsewhere)."""
        if path is None or self.tiers is None:
            return None
        text = os.fspath(path).rstrip("/")
        for root in (self.output_dir, self.tiers.tier.root):
            if "://" in text or "://" in root:
                parent, _, name = text.rpartition("/")
                if parent == root.rstrip("/") and name:
                    return validate_checkpoint_id(name)
            elif os.path.dirname(os.path.abspath(text)) == os.path.abspath(root):
                return validate_checkpoint_id(os.path.basename(text))
        return None

    def _state_to_save(self) -> dict[str, Any]:
        return {c.key: c.stateful for c in self.components}

    @_collective
    def save_checkpoint(self, checkpoint_path: str | os.PathLike | None = None, checkpoint_id: str | None = None,
                        validate: bool = False, extra: Mapping[str, Any] | None = None, *,
                        drain: bool | None = None) -> str:
        """Save every component; returns the committed checkpoint's path. Collective.

        With a local tier the save is committed in the local tier when this returns, and the path is
        where it will be in ``output_dir`` once drained; ``drain`` (default: ``LocalTier.drain_every``)
        says whether to drain it.
        """
        self._check_open()
        path, writer, planner, check, finish = self._prepare_save(checkpoint_path, checkpoint_id, validate, extra,
                                                                  drain)
        try:
            with _rank_errors(failed_save=writer, group=self.group), single_process_dcp(self.group is None), \
                    paused_gc():
                dcp.save(self._state_to_save(), storage_writer=writer, planner=planner,
                         process_group=self.group, no_dist=self.group is None, use_collectives=False)
        except BaseException as err:
            if check is not None:
                try:
                    check.wait()  # its thread must not outlive the save; the save's error wins
                except BaseException as check_error:
                    if check_error is not err:
                        err.add_note(f"the replication check also failed: {check_error}")
            raise
        if check is not None:
            check.wait()
        if finish is not None:
            finish()
        self.last_manifest = writer.manifest
        logger.info("rank %d: saved %s", self.rank, redact_url(path))
        return path

    @_collective
    def async_save(self, checkpoint_path: str | os.PathLike | None = None, checkpoint_id: str | None = None,
                   validate: bool = False, extra: Mapping[str, Any] | None = None, *,
                   drain: bool | None = None) -> AsyncSaveHandle:
        """Save every component in the background; returns once the state is staged. Collective.

        With blocking staging (the default) the state may change freely once this returns. With
        overlapped staging it returns before the large tensors are copied: change saved tensors in
        place only after a declared mutation point (``install_step_hook``, ``wait_for_staging``,
        ``mutating``); a change before it refuses the save (``UndeclaredMutationError`` on the
        handle), and nothing is committed. Waits for the previous async save first and
        raises its failure, unless the caller already saw it on that save's handle (on any rank).
        ``handle.result()`` gives the committed path or raises the background error. See
        ``dcp_forge.async_save`` for how staging buffers are reused.
        """
        self._check_open()
        path, writer, planner, check, finish = self._prepare_save(checkpoint_path, checkpoint_id, validate, extra,
                                                                  drain, background=True)

        def committed(handle: AsyncSaveHandle) -> None:  # on the background thread, on every rank
            if finish is not None:
                finish()
            self.last_manifest = handle.manifest

        # The replication check reads the live state: its verdict is awaited once staged, before the
        # upload starts and before this returns (a mismatch raises here, on every rank; nothing is saved).
        return self._async_saves.start(self._state_to_save(), path, writer, planner,
                                       after_staging=check.wait if check is not None else None,
                                       on_committed=committed)

    # --- declared mutation points (overlapped staging) ---------------------------------------------
    def wait_for_staging(self) -> None:
        """Return once the in-flight async save no longer reads the live state; call it before changing
        saved tensors in place. Local; returns at once when no overlapped staging is copying."""
        self._async_saves.wait_for_staging()

    @contextlib.contextmanager
    def mutating(self) -> Iterator[None]:
        """``with coordinator.mutating(): ...`` around code that changes saved tensors in place (an EMA
        update, a weight edit) waits for an overlapped staging first. Local."""
        self.wait_for_staging()
        yield

    def install_step_hook(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Make every ``optimizer.step()`` wait for an overlapped staging still copying (a step pre-hook,
        ``Optimizer.register_step_pre_hook``). Returns the hook's handle (``.remove()`` takes it off).

        Optimizer steps are where parameters and optimizer state change; other places that change
        saved tensors in place need ``wait_for_staging()`` or ``mutating()``. A wrapper that steps an
        inner optimizer (accelerate's ``AcceleratedOptimizer``: ``.optimizer``) gets the hook on the
        inner one, whose step is the one that runs.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise DeclarationTypeError(f"install_step_hook needs a torch.optim.Optimizer (got {describe_type(optimizer)})")
        inner = getattr(optimizer, "optimizer", None)
        while isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
            inner = getattr(optimizer, "optimizer", None)
        saves = weakref.ref(self._async_saves)  # the hook must not keep a closed coordinator's saver alive

        def wait_for_staging(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            saver = saves()
            if saver is not None:
                saver.wait_for_staging()

        return optimizer.register_step_pre_hook(wait_for_staging)

    # --- lifecycle ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._async_saves.closed:
            raise ValueError(f"CheckpointCoordinator of rank {self.rank} is closed")

    def wait(self) -> None:
        """Block until the in-flight async save (if any) finished; raise its failure unless this rank's
        caller saw it already (on its handle, or raised at a save). With a local tier, then wait for the
        drain in flight too. Local."""
        self._async_saves.settle()
        if self.tiers is not None:
            self.tiers.wait()

    def close(self) -> None:
        """Wait for the in-flight async save and drain, then free staging buffers and process groups.
        Idempotent.

        Raises AsyncSaveError if an async save failed and the failure reached neither its handle's
        caller nor a save; DrainError likewise for a drain.
        """
        if self._async_saves.closed:
            return
        try:
            try:
                self._async_saves.close()
            finally:
                if self.tiers is not None:
                    self.tiers.close()
        finally:
            release_group(self._validation_group)
            release_group(self.group)


    # --- load ---------------------------------------------------------------------------------
    def _resolve_load_path(self, checkpoint_path: str | os.PathLike | None) -> str:
        if checkpoint_path is not None:
            return os.fspath(checkpoint_path)
        latest = self.run_on_coordinator(lambda: latest_checkpoint(self.output_dir, self.storage_options))
        if latest is None:
            raise CheckpointNotFoundError(f"no committed checkpoint under {redact_url(self.output_dir)}")
        return latest

    @_collective
    def load_checkpoint(self, checkpoint_path: str | os.PathLike | None = None, strict: bool = True, *,
                        components: Iterable[str] | None = None, keys: Mapping[str, Iterable[str]] | None = None,
                        read_once: bool | None = None) -> LoadResult:
        """Load components from ``checkpoint_path`` (default: the latest committed one). Collective.

        Missing required components raise unless ``strict=False``; missing optional ones are skipped
        with a warning. In strict mode, components in the checkpoint that nobody declared raise
        (unless ``components`` selects what to load). Partial load: ``components`` names the
        components to load; ``keys`` maps a component to glob patterns of its state keys to load
        (``{"model": ["layers.0.*"]}``), the others keep their current value. A changed world size,
        node or group layout is handled per component (docs/RESHARDING.md) and logged, one line per
        component. ``read_once``: each stored byte is read from storage by one rank and sent to the
        others over the coordinator's gloo group (default: when ranks on several nodes or an object
        store are involved, see ``read_once_by_default``).

        Returns a ``LoadResult`` (path-like: ``os.fspath(result)`` is the checkpoint's path) saying
        what was loaded and what was not.
        """
        self._check_open()
        expect_type("strict", strict, bool)
        expect_type("read_once", read_once, bool, optional=True)
        expect_type("checkpoint_path", checkpoint_path, (str, os.PathLike), optional=True)
        self._async_saves.settle(raise_failure=False)  # a save in flight may become the latest
        what = {"strict": strict, "components": components, "keys": keys}
        if self.tiers is not None and (checkpoint_path is None or self._id_in_tiers(checkpoint_path) is not None):
            return self._load_tiered(self._id_in_tiers(checkpoint_path), read_once, what)
        path = self._resolve_load_path(checkpoint_path)
        return self._load_from(path, path, self._reader(path, read_once), 0, what)

    def _reader(self, path: str, read_once: bool | None, readers: Mapping[str, Any] | None = None
                ) -> ForgeStorageReader:
        """The storage reader of a load from ``path`` (``readers``: a local tier spread over nodes)."""
        if readers is not None and self.group is not None:
            return ReadOnceStorageReader(path, group=self.group, thread_count=self.thread_count,
                                         verify_checksums=self.verify_checksums, readers=readers)
        if read_once is None:
            read_once = read_once_by_default(self.topology, open_backend(path, self.storage_options)[0])
        if read_once and self.group is not None:
            return ReadOnceStorageReader(path, self.storage_options, group=self.group, thread_count=self.thread_count,
                                         verify_checksums=self.verify_checksums)
        return ForgeStorageReader(path, self.storage_options, thread_count=self.thread_count,
                                  verify_checksums=self.verify_checksums)

    def _load_tiered(self, checkpoint_id: str | None, read_once: bool | None, what: Mapping[str, Any]) -> LoadResult:
        """Load the newest checkpoint (or ``checkpoint_id``) committed and intact in any tier, trying its
        local copy first; a copy found damaged (a checksum, a missing file; for the local tier also a
        failing disk) is logged and the next copy is tried. See tiers/recovery.py."""
        tiers = self.tiers
        if tiers is None:
            raise ValueError("this coordinator has no local tier")
        sources = tiers.sources(self.group, checkpoint_id)
        if not sources:
            what_id = f"checkpoint {checkpoint_id}" if checkpoint_id else "checkpoint"
            raise CheckpointNotFoundError(f"no committed {what_id} in the local tier {tiers.tier.root} or under "
                                          f"{redact_url(self.output_dir)}")

        def load(source: Source) -> LoadResult:
            canonical = self.checkpoint_path(source.checkpoint_id)
            if source.tier == LOCAL:
                path = tiers.local_copy_path(source.checkpoint_id)
                reader = functools.partial(self._reader, path, False if read_once is None else read_once,
                                           tiers.readers(source))
            else:
                path = source.url or canonical
                reader = functools.partial(self._reader, path, read_once)
            # Made in the call: _load_from holds the reader's only reference and frees it (see there).
            result = self._load_from(canonical, path, reader(), tiers.records_rank(source), what, source.tier)
            tiers.last_loaded = source
            return result

        for source, following in zip(sources[:-1], sources[1:], strict=True):
            try:
                return load(source)
            except (IntegrityError, OSError) as err:
                if not (isinstance(err, (IntegrityError, CheckpointNotFoundError)) or source.tier == LOCAL):
                    raise  # the store could not be reached: not a damaged copy, nothing to fall back from
                if self.rank == 0:
                    logger.warning("could not load %s (%s: %s); loading %s instead", source.describe(),
                                   type(err).__name__, err, following.describe())
        return load(sources[-1])

    def _load_from(self, canonical: str, path: str, reader: ForgeStorageReader, records_rank: int,
                   what: Mapping[str, Any], tier: str | None = None) -> LoadResult:
        """Load from the copy at ``path`` (this rank's; ``canonical``: the checkpoint's path in results)."""
        with paused_gc():
            result = self._load_copy(canonical, path, reader, records_rank, what, tier)
            # The reader holds the checkpoint's metadata and index rows (objects per stored item): freed
            # here, while the collector rests, its first collection does not have to walk them all.
            del reader
            return result

    def _load_copy(self, canonical: str, path: str, reader: ForgeStorageReader, records_rank: int,
                   what: Mapping[str, Any], tier: str | None) -> LoadResult:
        """``_load_from``'s work, run while the garbage collector is paused."""
        strict = what["strict"]
        # One rank reads the metadata files; every reader adopts them (no per-rank re-reads).
        metadata, manifest, records = collectives.run_on(
            self.group, records_rank, lambda: (reader.read_metadata(), reader.manifest, reader.records))
        reader.use_metadata(metadata, manifest, records)
        selection: LoadSelection = self._on_every_rank(
            lambda: LoadSelection.build([c.key for c in self.components], what["components"], what["keys"]))
        decision = self._on_every_rank(lambda: decide_loads(
            self.components, {top_level_key(fqn) for fqn in metadata.state_dict_metadata},
            manifest.save_topology if manifest is not None else None, self.topology, strict=strict, path=path,
            selection=selection))
        for message in decision.warnings:
            warnings.warn(message, stacklevel=3)
        for c in decision.loading:
            prepare_for_load(c.stateful)
        planner = ForgeLoadPlanner(decision.loading, self.topology, key_map=decision.key_map,
                                   allow_partial_load=not strict,
                                   select_keys={k: v for k, v in selection.keys.items() if k in decision.key_map},
                                   saved_forms=self._on_every_rank(lambda: saved_forms(records)))
        with _rank_errors(), single_process_dcp(self.group is None):
            dcp.load({c.key: c.stateful for c in decision.loading}, storage_reader=reader, planner=planner,
                     process_group=self.group, no_dist=self.group is None)
        for c in decision.reseed:
            c.stateful.reseed(self.rank)
        self.last_manifest = manifest
        component_of = {storage: component for component, storage in decision.key_map.items()}
        with_dtensors = {component_of.get(top_level_key(fqn)) for fqn, value in planner.state_dict.items()
                         if isinstance(value, DTensor)}
        changes = tuple(c.log_line(holds_dtensors=c.component in with_dtensors) for c in decision.changes.values())
        if self.rank == 0:
            _announce_topology_changes(changes)
        result = LoadResult(path=canonical, loaded=tuple(c.key for c in decision.loading),
                            not_loaded=dict(decision.not_loaded), keys_not_loaded=planner.keys_not_loaded(),
                            topology_changes=changes, bytes_read=reader.bytes_read,
                            read_once=isinstance(reader, ReadOnceStorageReader), tier=tier)
        logger.info("rank %d: %s", self.rank, result.summary())
        return result


def _announce_topology_changes(lines: Sequence[str]) -> None:
    """Rank 0: what a load did about a changed topology, where the user sees it: through logging
    when a handler would show these lines, else as a TopologyChangeWarning (under torchrun, nothing
    configures logging, and a log record nobody handles is dropped)."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        for line in lines:
            logger.info("%s", line)
        return
    for line in lines:
        warnings.warn(line, TopologyChangeWarning, stacklevel=3)


def _check_arguments(state_components: Any, process_groups: Any, output_dir: Any, storage_options: Any, node: Any,
                     thread_count: Any, chunk_policy: Any, verify_checksums: Any, training_args_hash: Any) -> None:
    """Types of CheckpointCoordinator's arguments, checked before anything collective happens."""
    if isinstance(state_components, (StateComponent, str, bytes, Mapping)) or not isinstance(state_components,
                                                                                                 Iterable):
        raise DeclarationTypeError(f"'state_components' must be a list of StateComponent (got "
                                   f"{describe_type(state_components)})")
    expect_type("process_groups", process_groups, Mapping, optional=True)
    expect_type("output_dir", output_dir, (str, os.PathLike))
    expect_type("storage_options", storage_options, Mapping, optional=True)
    expect_type("node", node, (int, str), optional=True)
    expect_type("thread_count", thread_count, int)
    if thread_count < 1:
        raise ComponentDeclarationError(f"'thread_count' must be >= 1 (got {thread_count})")
    expect_type("chunk_policy", chunk_policy, ChunkPolicy)
    expect_type("verify_checksums", verify_checksums, bool)
    expect_type("training_args_hash", training_args_hash, str, optional=True)


def _check_extra(extra: Any) -> None:
    """``extra`` goes into the JSON manifest, written last: refuse what JSON cannot hold before writing."""
    expect_type("extra", extra, Mapping, optional=True)
    try:
        json.dumps(dict(extra or {}), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise DeclarationTypeError(f"'extra' must hold JSON values only (string keys; no NaN): {err}") from err


def read_manifest(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> CheckpointManifest:
    """The manifest of the checkpoint at ``path`` (FileNotFoundError for plain DCP checkpoints)."""
    backend, native = open_backend(path, storage_options)
    try:
        return CheckpointManifest.from_json(backend.read_bytes(backend.join(native, MANIFEST_FILE)))
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(
            f"{redact_url(path)} has no {MANIFEST_FILE} (not a dcp_forge checkpoint, or not one at all)") from err
