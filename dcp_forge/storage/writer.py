"""ForgeStorageWriter: DCP storage writer over any backend, with checksums and an atomic commit.

Call protocol (DCP's ``StorageWriter``): ``reset`` → on every rank ``set_up_storage_writer`` and
``prepare_local_plan``; on the coordinator ``prepare_global_plan`` (claims the checkpoint id);
on every rank ``write_data``; on the coordinator ``finish`` (refuses unless every rank's results
cover its share of the global plan, then index, metadata, manifest, commit).
If the save fails (DCP raises its ``CheckpointException`` on every rank), the caller calls
``discard_failed_save`` on every rank: the coordinator removes what the save wrote.

With ``dcp.save(..., use_collectives=False)`` (ranks planning on their own, planners/save.py) the
writer needs ``exchange`` (the planner's): the coordinator claims the checkpoint id in
``prepare_local_plan`` (the planner's agreement shares the outcome before anyone writes), a rank's
failure to write is kept for ``finish``, and ``finish`` on every rank runs
``shared_commit.commit_over_exchange``, which commits on the coordinator exactly as above.

Files keep DCP's layout (``__<rank>_<n>.distcp`` holding ``torch.save`` blobs, written without the
zip CRC pass, see torch_blob.py; a pickled ``.metadata`` with plain ``_StorageInfo`` entries), so
DCP's own ``FileSystemReader`` reads them. Plain tensors and small values go into packs instead of a
zip each (pack.py): every one of them is still a zip DCP's reader loads, sharing one run of records.
Each rank writes its items into ``thread_count`` files in parallel, hashing the bytes as they go.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from collections.abc import Callable, Container, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..core.components import ComponentLayout
from ..core.coverage import metadata_gaps, write_result_gaps
from ..core.key_paths import encode_path
from ..core.keys import top_level_key
from ..core.placement import indexed_key, item_bytes
from ..core.tensors import math_bits, raw_view, with_math_bits
from ..core.topology import Topology
from ..errors import IncompleteSaveError, os_error_context
from ..format.dcp_metadata import metadata_pickle, share_tensor_parts
from ..format.index import StoredItem, encode_columns
from ..format.manifest import (
    CheckpointManifest,
    checksum_bytes,
    component_manifests_of,
    item_columns_and_locations,
    versions,
)
from ..format.names import COMMIT_FILE, INDEX_FILE, MANIFEST_FILE, METADATA_FILE, data_file_name, new_save_id
from ..format.pack import (
    LARGE_PACK_BYTES,
    PACK_BYTES,
    PACKED_TENSOR_MAX_BYTES,
    SMALL_ITEM_BYTES,
    PackWriter,
    packable_tensor,
    value_pickle,
)
from ..format.torch_blob import BlobEdges, save_tensor
from ..rank_exchange import RankExchange
from .backends import OutputStream, discard_after
from .cross_check import coverage_problems
from .lifecycle import CommitRecord, claim, commit, discard_claimed
from .registry import open_backend, redact_url
from .shared_commit import PlansForCommit, commit_over_exchange

# Tensor blobs from this size on get their data offset recorded in the index, so a load reads them
# straight into their destination in one read. Below it the zip parse costs more than the copy
# it saves.
LAYOUT_MIN_BYTES = 256 * 1024

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _RankFiles:
    """``SavePlan.storage_data``: which rank's file names a plan writes to."""

    rank: int


class _HashingStream:
    """Passes writes to ``out``, hashing each item's bytes and keeping its edges (where a tensor
    blob's zip records are, see torch_blob.py) as they stream past."""

    def __init__(self, out: OutputStream) -> None:
        self.out = out
        self._hasher = xxhash.xxh3_64()
        self._start = 0
        self._edges = BlobEdges()

    def begin_item(self) -> None:
        self._hasher.reset()
        self._start = self.out.tell()
        self._edges.clear()

    def end_item(self) -> tuple[int, int, str]:
        return self._start, self.out.tell() - self._start, self._hasher.hexdigest()

    def data_offset(self, length: int) -> int | None:
        """Where the tensor's bytes start in the item just written, if it is one plain tensor."""
        layout = self._edges.layout(length)
        return None if layout is None else layout.data_offset

    def write(self, data: Any) -> int:
        self._hasher.update(data)
        self._edges.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    def tell(self) -> int:
        return self.out.tell()


def _bins(items: Sequence[WriteItem], count: int) -> list[list[WriteItem]]:
    """Split items into ``count`` lists of about equal bytes (largest first onto the lightest)."""
    bins: list[list[WriteItem]] = [[] for _ in range(max(1, count))]
    loads = [0] * len(bins)
    sizes = list(map(item_bytes, items))
    # Largest first; the sort is stable, so items of one size keep their order.
    for at in sorted(range(len(items)), key=sizes.__getitem__, reverse=True):
        i = loads.index(min(loads))
        bins[i].append(items[at])
        loads[i] += sizes[at]
    return [b for b in bins if b]


def _write_item(stream: _HashingStream, item: WriteItem, data: Any) -> None:
    if item.type == WriteItemType.BYTE_IO:
        stream.write(data.getbuffer() if isinstance(data, io.BytesIO) else data)
        return
    tensor = data.detach()
    if tensor.device.type != "cpu":  # the storage's bytes move; lazy-view flags are put back on
        tensor = with_math_bits(raw_view(tensor).cpu(), math_bits(tensor))
    save_tensor(tensor, stream)


def _packable(item: WriteItem, data: Any, form: Any) -> torch.Tensor | memoryview | None:
    """What of ``data`` goes into a pack (pack.py): a plain tensor, or the pickle of a small value
    holding no tensor; None for everything stored in a zip of its own."""
    if item.type is WriteItemType.BYTE_IO:
        return value_pickle(data.getbuffer() if isinstance(data, io.BytesIO) else data)
    if form is not None and form.math_bits is not None:
        return None  # stored as torch.save stores flagged tensors, with its flags in data.pkl
    # Only its bytes are read: a plain tensor outside autograd (what resolve_data gives) needs no detached copy.
    tensor = data if type(data) is torch.Tensor and not data.requires_grad else data.detach()
    if not tensor.is_cpu and tensor.device.type != "meta" and tensor.nbytes <= PACKED_TENSOR_MAX_BYTES:
        tensor = tensor.cpu()
    return tensor if packable_tensor(tensor) else None


class _Packs:
    """The pack being filled in one data file: small items and large tensors each in packs of their
    own kind (pack.py), one pack open at a time, closed when full, when an item of the other kind
    comes, and at the end; each closed pack adds one result per item to ``results``."""

    def __init__(self, out: OutputStream, name: str, rank: int, results: list[WriteResult]) -> None:
        self.out, self.name, self.rank, self.results = out, name, rank, results
        self._pack: PackWriter | None = None
        self._large = False
        self._limit = PACK_BYTES
        self._base = 0
        self._items: list[tuple[WriteItem, Any]] = []

    def add(self, item: WriteItem, packed: torch.Tensor | memoryview, form: Any) -> None:
        large = isinstance(packed, torch.Tensor) and packed.nbytes > SMALL_ITEM_BYTES
        if self._pack is not None and large != self._large:
            self.close()
        if self._pack is None:
            self._pack, self._large, self._base = PackWriter(self.out), large, self.out.tell()
            self._limit = LARGE_PACK_BYTES if large else PACK_BYTES
        if isinstance(packed, torch.Tensor):
            self._pack.add_tensor(packed)
        else:
            self._pack.add_value(packed)
        self._items.append((item, form))
        if self._pack.size >= self._limit:
            self.close()

    def close(self) -> None:
        """Write the open pack's trailers (if one is open) and the results of its items."""
        if self._pack is None:
            return
        placed = self._pack.close()
        items, self._items, self._pack = self._items, [], None
        self.results += [
            WriteResult(index=item.index, size_in_bytes=where.length - where.gap_length, storage_data=StoredItem(
                self.name, self._base + where.offset, where.length, where.checksum, self.rank, where.data_offset,
                key_path=encode_path(form.key_path) if form is not None and form.key_path else None,
                gap_offset=where.gap_offset, gap_length=where.gap_length))
            for (item, form), where in zip(items, placed, strict=True)]


class ForgeStorageWriter(StorageWriter):
    """Writes one checkpoint directory at ``url`` (a local path or any fsspec URL).

    ``thread_count``: files (and threads) per rank. ``extra``: JSON-able data stored in the
    manifest (step, metrics). ``commit_gate``: called on the coordinator once every rank's data is
    durable, before any record is written; if it raises, the save fails and nothing is committed.
    ``on_committed``: called on the coordinator with the manifest once the commit marker exists.
    ``exchange``: the collectives of a save whose ranks plan on their own (the planner's).

    A failed save is cleaned up by ``discard_failed_save``, which the caller of ``dcp.save`` calls on
    every rank once DCP raised the failure everywhere (``CheckpointCoordinator`` does).
    """

    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                 thread_count: int = 2, extra: Mapping[str, Any] | None = None,
                 training_args_hash: str | None = None,
                 commit_gate: Callable[[], None] | None = None,
                 on_committed: Callable[[CheckpointManifest], None] | None = None,
                 exchange: RankExchange | None = None) -> None:
        super().__init__()
        if not isinstance(thread_count, int) or thread_count < 1:
            raise ValueError(f"'thread_count' must be a positive int (got {thread_count!r})")
        self.storage_options = dict(storage_options or {})
        self.thread_count = thread_count
        self.extra = dict(extra or {})
        self.training_args_hash = training_args_hash
        self.commit_gate = commit_gate
        self.on_committed = on_committed
        self.manifest: CheckpointManifest | None = None
        self._layouts: Mapping[str, ComponentLayout] = {}
        self._topology: Topology | None = None
        self._global_plan: list[SavePlan] | None = None  # on the coordinator, once planned
        self.is_coordinator = False
        self.rank = 0
        self.exchange = exchange
        self._own_exchange: RankExchange | None = None  # use_collectives=False: it replaces DCP's gathers
        self._planner: SavePlanner | None = None
        self._write_error: Exception | None = None
        self.reset(url)

    # --- DCP StorageWriter protocol ----------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.url = os.fspath(checkpoint_id)
            self.backend, self.path = open_backend(self.url, self.storage_options)
        self.save_id = new_save_id()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=redact_url(self.url), save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0) or 0)
        self._planner, self._write_error, self._own_exchange = None, None, None
        if not kwargs.get("use_collectives", True):
            if self.exchange is None:
                raise ValueError("dcp.save(use_collectives=False) with a ForgeStorageWriter needs exchange=: the "
                                 "RankExchange its ForgeSavePlanner plans over")
            self._own_exchange = self.exchange

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self._own_exchange is not None and self.is_coordinator:
            # Before any rank writes: the planner's agreement, next, shares a failure with every rank.
            try:
                self.claim_directory()
            except Exception as err:
                self._own_exchange.note_failure(err)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if self._own_exchange is not None:  # each rank's own plan, claimed in prepare_local_plan
            return [dataclasses.replace(plan, storage_data=_RankFiles(self.rank)) for plan in plans]
        # Runs on the coordinator before any rank writes; an error here reaches every rank.
        self.claim_directory()
        self._global_plan = [dataclasses.replace(plan, storage_data=_RankFiles(rank))
                             for rank, plan in enumerate(plans)]
        return self._global_plan

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        self._layouts = getattr(planner, "layouts", {}) or {}
        self._topology = getattr(planner, "topology", None)
        if self._own_exchange is None:
            return self._write_plan(plan, planner)
        self._planner = planner
        try:  # kept for finish, where every rank learns of it: no rank may wait for a peer that raised
            if not isinstance(planner, PlansForCommit):
                raise ValueError(f"dcp.save(use_collectives=False) with a ForgeStorageWriter needs a planner that "
                                 f"plans on every rank (ForgeSavePlanner with exchange=), not {type(planner).__name__}")
            return self._write_plan(plan, planner)
        except Exception as err:
            self._write_error = err
            done: Future[list[WriteResult]] = Future()
            done.set_result([])
            return done

    def _write_plan(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rank = plan.storage_data.rank if isinstance(plan.storage_data, _RankFiles) else self.rank
        bins = _bins(plan.items, self.thread_count)
        results: list[WriteResult] = []
        if bins:
            with ThreadPoolExecutor(max_workers=len(bins), thread_name_prefix="forge-write") as pool:
                futures = [pool.submit(self._write_file, data_file_name(rank, i), items, planner, rank)
                           for i, items in enumerate(bins)]
                errors = []
                for f in futures:
                    try:
                        results.extend(f.result())
                    except BaseException as err:  # collect, so every file is closed or aborted first
                        errors.append(err)
                if errors:
                    raise errors[0]
            self.backend.sync_dir(self.path)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write_file(self, name: str, items: Sequence[WriteItem], planner: SavePlanner,
                    rank: int) -> list[WriteResult]:
        full = self.backend.join(self.path, name)
        def context() -> str:  # disk full, read-only, permissions: which file, and what it holds
            held = sorted({top_level_key(item.index.fqn) for item in items})
            return f"rank {rank} writing {name} of checkpoint {redact_url(self.url)} (holds {held[:4]})"

        with os_error_context(context, full):
            return self._write_items(full, name, items, planner, rank)

    def _write_items(self, full: str, name: str, items: Sequence[WriteItem], planner: SavePlanner,
                     rank: int) -> list[WriteResult]:
        out = self.backend.open_output(full)
        stream = _HashingStream(out)
        results: list[WriteResult] = []
        packs = _Packs(out, name, rank, results)
        forms = getattr(planner, "saved_forms", None) or {}  # what DCP's metadata cannot say (values.py)
        try:
            for item in items:
                data = planner.resolve_data(item)
                form = forms.get(item.index.fqn)
                packed = _packable(item, data, form)
                if packed is not None:
                    packs.add(item, packed, form)
                    continue
                packs.close()  # a pack's items stay next to each other
                stream.begin_item()
                _write_item(stream, item, data)
                offset, length, checksum = stream.end_item()
                data_offset = (stream.data_offset(length)
                               if item.type != WriteItemType.BYTE_IO and length >= LAYOUT_MIN_BYTES else None)
                results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=StoredItem(
                    name, offset, length, checksum, rank, data_offset,
                    key_path=encode_path(form.key_path) if form is not None and form.key_path else None,
                    math_bits=form.math_bits if form is not None else None)))
            packs.close()
            out.close()
        except BaseException as err:
            discard_after(out, err)
            raise
        return results

    def discard_failed_save(self, error: BaseException, group: Any = None) -> None:
        """Remove what this failed save wrote. Collective over ``group`` (the save's process group;
        None: one process): call on every rank once ``dcp.save`` raised ``error`` on every rank (DCP's
        ``CheckpointException``: the ranks agree, and none writes any more).

        The coordinator, which claimed the directory, removes it: every rank's files, the records,
        the claim last (``commit.discard_claimed``: only if its claim carries this save's id and it has
        no commit marker); every rank returns once it is gone. Best effort: if removing fails,
        ``error`` gets a note saying so and what to run, and stays the error raised.
        """
        if self.is_coordinator:
            try:
                with os_error_context(f"rank {self.rank} removing what the failed save wrote to checkpoint "
                                      f"{redact_url(self.url)}", self.path):
                    if discard_claimed(self.backend, self.path, self.save_id):
                        logger.info("removed the uncommitted %s of a failed save", redact_url(self.url))
            except Exception as cleanup_error:  # noted on the save's error, which the caller raises
                error.add_note(f"removing what the failed save wrote failed too ({type(cleanup_error).__name__}: "
                               f"{cleanup_error}); dcp_forge.discard_partial_checkpoints removes it later")
        if group is not None:
            try:
                dist.barrier(group=group)
            except Exception as barrier_error:  # a peer gone: the save's error is still the one to raise
                error.add_note(f"rank {self.rank} could not wait for the failed save's cleanup: {barrier_error}")

    def _write_record(self, name: str, data: bytes) -> None:
        full = self.backend.join(self.path, name)
        with os_error_context(f"rank {self.rank} writing {name} of checkpoint {redact_url(self.url)}", full):
            self.backend.write_bytes(full, data)

    def _refuse_incomplete(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Raise IncompleteSaveError unless every rank's results are here and cover every planned item,
        and every tensor of the metadata is tiled by its chunks (the check loads make too).

        DCP calls ``finish`` with whatever its gather produced; a rank that took no part (its process
        group gone, a single-process fallback) must never let the others' share pass for the whole.
        """
        problems = []
        world = self._topology.world_size if self._topology is not None else None
        if self._global_plan is None:
            problems.append("no global plan was made on this writer (prepare_global_plan was not called)")
            written: Container[tuple[str, Any]] = {indexed_key(result) for rank_results in results
                                                   if rank_results is not None for result in rank_results}
        else:
            if world is not None and len(self._global_plan) != world:
                problems.append(f"the global plan has {len(self._global_plan)} rank(s), the save's topology {world}")
            result_gaps = write_result_gaps(self._global_plan, results)
            problems += result_gaps.problems
            written = result_gaps.written
        # One walk over the metadata finds its unstored pieces and the tensors whose tiling needs checking.
        gaps = metadata_gaps(metadata, written)
        problems += [p.message for p in coverage_problems(metadata, gaps.not_whole, redact_url(self.url))]
        problems += [f"{len(missing)} piece(s) of {fqn!r} in the metadata have no write result"
                     for fqn, missing in gaps.unstored.items()]
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            raise IncompleteSaveError(f"not committing checkpoint {redact_url(self.url)}: {shown}")

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self._own_exchange is not None:
            planner = self._planner if isinstance(self._planner, PlansForCommit) else None
            commit_over_exchange(self._own_exchange, planner, results[0] if results else [], self._write_error,
                                 self._commit_gathered, redact_url(self.url))
            return
        self._commit(metadata, results)

    def _commit_gathered(self, global_plan: list[SavePlan], metadata: Metadata,
                         results: list[list[WriteResult]]) -> str:
        """The coordinator's commit of a save whose ranks planned on their own; returns the save id."""
        self._global_plan = [dataclasses.replace(plan, storage_data=_RankFiles(rank))
                             for rank, plan in enumerate(global_plan)]
        self._commit(metadata, results)
        return self.save_id

    def _commit(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        started = time.perf_counter()
        self._refuse_incomplete(metadata, results)
        if self.commit_gate is not None:
            self.commit_gate()
        topology = self._topology or Topology(rank=0, world_size=max(1, len(results)))
        # Equal parts of the metadata made one object each (the pickle writes them once), its
        # storage_data made of them as it is built.
        parts = share_tensor_parts(metadata)
        columns, metadata.storage_data = item_columns_and_locations(metadata, results, self._layouts, parts.location)
        # As DCP's FileSystemWriter.finish records them: readers look for the save's ids and the version.
        metadata.storage_meta = self.storage_meta()
        metadata.version = CURRENT_DCP_VERSION
        index_bytes = encode_columns(columns)
        metadata_bytes = metadata_pickle(metadata)
        manifest = CheckpointManifest(
            checkpoint_path=redact_url(self.url), world_size=topology.world_size,
            timestamp=datetime.now(UTC), components=component_manifests_of(columns, self._layouts, topology),
            training_args_hash=self.training_args_hash, versions=versions(), topology=topology.to_json(),
            files={METADATA_FILE: checksum_bytes(metadata_bytes), INDEX_FILE: checksum_bytes(index_bytes)},
            extra=self.extra,
        )
        manifest_bytes = manifest.to_json().encode()
        # The three records only need to be durable before the commit marker, not in any order
        # among themselves: written in parallel, their fsyncs share journal commits (local disk)
        # or their uploads overlap (object stores).
        records_to_write = {INDEX_FILE: index_bytes, METADATA_FILE: metadata_bytes, MANIFEST_FILE: manifest_bytes}
        with ThreadPoolExecutor(max_workers=len(records_to_write), thread_name_prefix="forge-records") as pool:
            for f in [pool.submit(self._write_record, name, data) for name, data in records_to_write.items()]:
                f.result()
        self.backend.sync_dir(self.path)
        record = CommitRecord(checkpoint_id=os.path.basename(self.path.rstrip("/")), save_id=self.save_id,
                              committed_at=time.time(), manifest_checksum=checksum_bytes(manifest_bytes))
        committed = self.commit_directory(record)
        self.manifest = manifest
        logger.info("%s %s: %d items, %d bytes (finish %.3fs)", "committed" if committed else "wrote the records of",
                    redact_url(self.url), len(columns["fqn"]), sum(columns["length"]), time.perf_counter() - started)
        if self.on_committed is not None:
            self.on_committed(manifest)

    # --- what a save in another process hands back (async_process: uploads in a process of their own) ---
    def outcome(self) -> Any:
        """What the caller's copy of this writer needs of a save that ran on another copy of it."""
        return self.manifest

    def adopt_outcome(self, outcome: Any) -> None:
        """Take over ``outcome()`` of the copy that saved."""
        self.manifest = outcome

    # --- the directory's lifecycle (a writer for a node-local tier claims and commits differently) ---
    def claim_directory(self) -> None:
        """On the coordinator, before any rank writes: take the checkpoint id for this save."""
        claim(self.backend, self.path, self.save_id, self.url)

    def commit_directory(self, record: CommitRecord) -> bool:
        """On the coordinator, once every file and record is durable: create the commit marker.
        Returns whether the checkpoint is committed now (a writer may leave the commit to its caller)."""
        # If even reading the marker back fails, the outcome is unknown (ConnectionError): the
        # checkpoint is then complete, and committed exactly when latest_checkpoint lists it.
        with os_error_context(f"rank {self.rank} committing checkpoint {redact_url(self.url)}",
                              self.backend.join(self.path, COMMIT_FILE)):
            commit(self.backend, self.path, record)
        return True
