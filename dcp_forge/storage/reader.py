"""ForgeStorageReader: DCP storage reader over any backend, verifying checksums as it reads.

Call protocol (DCP's ``StorageReader``): ``reset`` → on every rank ``read_metadata``,
``set_up_storage_reader`` and ``prepare_local_plan``; on the coordinator ``prepare_global_plan``;
on every rank ``read_data``.

Reads only committed checkpoints (or plain DCP ones, which have no manifest). Each stored item is
read once per ``read_data`` however many destinations need it, ``thread_count`` threads each read
a consecutive run of about equal bytes, tensors go straight into their destinations where they can
(item_reader.py), and every item is checked against its xxh3 checksum from ``index.parquet``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.index import ItemRecord
from ..format.manifest import CheckpointManifest
from ..format.names import INDEX_FILE, METADATA_FILE
from ..format.safe_load import load_dcp_metadata
from .backends import InputFile
from .consistency import (
    ProblemKind,
    RecordFiles,
    parse_index,
    raise_if_problems,
    record_problems,
    storage_location_problems,
)
from .item_reader import (
    Checker,
    ItemLoader,
    PipelinedChecker,
    StoredRead,
    group_reads,
    load_stored_item,
    split_runs,
)
from .lifecycle import CheckpointState, checkpoint_state
from .registry import open_backend, redact_url

logger = logging.getLogger(__name__)

# How far each reader thread asks the storage to read ahead of the item it is working on.
PREFETCH_BYTES = 64 * 1024 * 1024

# What ``verify_checksums=False`` skips: comparisons of bytes with their recorded checksums.
_CHECKSUM_KINDS = (ProblemKind.CHECKSUM_MISMATCH, ProblemKind.STALE_MANIFEST)


class ForgeStorageReader(StorageReader):
    """Reads the checkpoint at ``url``. ``verify_checksums=False`` skips hashing (not recommended)."""

    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                 thread_count: int = 2, verify_checksums: bool = True) -> None:
        super().__init__()
        if not isinstance(thread_count, int) or thread_count < 1:
            raise ValueError(f"'thread_count' must be a positive int (got {thread_count!r})")
        self.storage_options = dict(storage_options or {})
        self.thread_count = thread_count
        self.verify_checksums = verify_checksums
        self.manifest: CheckpointManifest | None = None
        self.records: list[ItemRecord] = []
        self._record_at: dict[tuple[str, int], ItemRecord] = {}
        self.storage_data: dict[MetadataIndex, Any] = {}
        self.bytes_read = 0  # data bytes read from storage (stored items, not the metadata files)
        self._known: Metadata | None = None
        self.reset(url)

    # --- DCP StorageReader protocol ----------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.url = os.fspath(checkpoint_id)
            self.backend, self.path = open_backend(self.url, self.storage_options)
            self._known = None
        self.storage_data = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Read and check ``.metadata``, the manifest and the index (once; later calls reuse them)."""
        if kwargs.get("rank") is not None:
            raise FileNotFoundError("dcp_forge checkpoints have no per-rank metadata")
        if self._known is None:
            self._known = self._read_metadata_files()
        return self._known

    def use_metadata(self, metadata: Metadata, manifest: CheckpointManifest | None,
                     records: Sequence[ItemRecord]) -> None:
        """Adopt what another rank's ``read_metadata`` read and checked, instead of reading it again.

        The coordinator reads the metadata files on one rank and broadcasts them, so they are read
        from storage once per job rather than once per rank.
        """
        self._known, self.manifest, self.records = metadata, manifest, list(records)
        self._record_at = {r.location: r for r in self.records}

    def _read_metadata_files(self) -> Metadata:
        state = checkpoint_state(self.backend, self.path)
        where = redact_url(self.url)
        if state is CheckpointState.MISSING:
            raise CheckpointNotFoundError(f"no checkpoint at {where}")
        if state is CheckpointState.PARTIAL:
            raise CheckpointNotFoundError(
                f"checkpoint {where} was never committed (a save is running or crashed); it cannot be loaded")
        if state is CheckpointState.COMMITTED:
            files = RecordFiles.read(self.backend, self.path)
            manifest, problems = record_problems(files, where)
            if not self.verify_checksums:
                problems = [p for p in problems if p.kind not in _CHECKSUM_KINDS]
            raise_if_problems(problems)
            self.manifest = manifest
            metadata_bytes = files.metadata
            self.records, problems = parse_index(files.index, where)
            raise_if_problems(problems)
            self._record_at = {r.location: r for r in self.records}
        else:  # plain DCP checkpoint: no records of ours to check against
            metadata_bytes = self._read_file(METADATA_FILE)
        metadata = load_dcp_metadata(metadata_bytes, name=f"{where}/{METADATA_FILE}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not isinstance(metadata.storage_data, dict):
            raise IntegrityError(f"{redact_url(self.url)}/{METADATA_FILE} has no storage locations")
        raise_if_problems(storage_location_problems(metadata, redact_url(self.url)))
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self._read_stored(self.group_reads(plan.items), planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    # --- helpers ----------------------------------------------------------------------------
    def group_reads(self, items: Sequence[ReadItem]) -> list[StoredRead]:
        """``items`` grouped by stored item, in file order, with the tensor layouts the index records."""
        return group_reads(items, self.storage_data, self._record_at)

    @property
    def checker(self) -> Checker:
        """What verifies a stored item's checksum (None when there is nothing to verify against)."""
        return self._verify if self.verify_checksums and self._record_at else None

    def _read_stored(self, reads: Sequence[StoredRead], planner: LoadPlanner,
                     load: ItemLoader = load_stored_item) -> None:
        """Read stored items (in file order) on up to ``thread_count`` threads, ``load`` applying each."""
        runs = split_runs(reads, self.thread_count)
        if not runs:
            return
        with ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="forge-hash") as hashers:
            check = self.checker
            if check is not None:
                check = PipelinedChecker(check, hashers)
            if len(runs) == 1:
                self.bytes_read += self._read_run(runs[0], planner, load, check)
            else:
                with ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="forge-read") as pool:
                    for f in [pool.submit(self._read_run, run, planner, load, check) for run in runs]:
                        self.bytes_read += f.result()
            # After a read error, leaving this block still waits for the hashes (they read destination
            # memory), and the read error is the one raised.
            if check is not None:
                check.wait()

    def _read_file(self, name: str) -> bytes:
        try:
            return self.backend.read_bytes(self.backend.join(self.path, name))
        except FileNotFoundError as err:
            raise IntegrityError(f"{redact_url(self.url)} is missing {name}") from err

    def _read_run(self, run: Sequence[StoredRead], planner: LoadPlanner,
                  load: ItemLoader = load_stored_item, check: Checker = None) -> int:
        """Read consecutive stored items (one thread), one open handle per file; returns bytes read.

        The next ``PREFETCH_BYTES`` of the run are always requested ahead (``InputFile.prefetch``),
        so the disk keeps working while this thread verifies and places the current item.
        """
        handles: dict[str, InputFile] = {}
        done = 0
        ahead = 0  # run[:ahead] have been prefetched

        def handle_for(read: StoredRead) -> InputFile:
            handle = handles.get(read.file)
            if handle is None:
                handle = handles[read.file] = self._open_data_file(read)
            return handle

        try:
            for i, read in enumerate(run):
                window_end = read.offset + PREFETCH_BYTES
                while ahead < len(run) and (ahead <= i or (run[ahead].file == read.file
                                                           and run[ahead].offset < window_end)):
                    nxt = run[ahead]
                    if check is not None or nxt.layout is None:  # else only its tensor's bytes are read
                        handle_for(nxt).prefetch(nxt.offset, nxt.length)
                    ahead += 1
                try:
                    load(handle_for(read), read, planner, check)
                except EOFError as err:
                    raise IntegrityError(f"{redact_url(self.url)}: data file {read.file} is truncated "
                                         f"({err}); it holds {read.fqn!r}") from err
                done += read.length
        finally:
            for handle in handles.values():
                handle.close()
        return done

    def _open_data_file(self, read: StoredRead) -> InputFile:
        try:
            return self.backend.open_input(self.backend.join(self.path, read.file))
        except FileNotFoundError as err:
            raise IntegrityError(
                f"{redact_url(self.url)}: data file {read.file} is missing (holds {read.fqn!r})") from err

    def _verify(self, read: StoredRead, found: str) -> None:
        record = self._record_at.get((read.file, read.offset))
        if record is None:
            raise IntegrityError(
                f"{redact_url(self.url)}: {read.file}@{read.offset} ({read.fqn!r}) is not in {INDEX_FILE}")
        if found != record.checksum:
            raise IntegrityError(
                f"{redact_url(self.url)}: checksum mismatch in {read.file} at byte {read.offset} for component "
                f"{record.component!r} ({read.fqn!r}): expected {record.checksum}, found {found}")
