"""ForgeStorageReader: DCP storage reader over any backend, verifying checksums as it reads.

Call protocol (DCP's ``StorageReader``): ``reset`` → on every rank ``read_metadata``,
``set_up_storage_reader`` and ``prepare_local_plan``; on the coordinator ``prepare_global_plan``;
on every rank ``read_data``.

Reads only committed checkpoints (or plain DCP ones, which hold none of dcp_forge's records). Before
anything is read, the records are cross-checked (manifest against index, each location read against
its index row, each tensor's chunks tiling it: cross_check.py) and every data file is opened inside
the checkpoint, without following links, and bounds every extent read from it (files.py). Each
stored item is read once per ``read_data`` however many destinations need it, ``thread_count``
threads each read a consecutive run of about equal bytes (one thread for local files of small items
only: ``read_threads``), tensors go straight into their
destinations where they can (item_reader.py), and every item is checked against its xxh3 checksum
from ``index.parquet``.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.index import ItemRecord
from ..format.manifest import CheckpointManifest
from ..format.names import INDEX_FILE, METADATA_FILE, stripped_checkpoint_message, written_by_dcp_forge
from ..format.safe_load import load_dcp_metadata
from .backends import InputFile, LocalBackend
from .consistency import (
    ProblemKind,
    RecordFiles,
    parse_index,
    raise_if_problems,
    record_problems,
    storage_location_problems,
)
from .cross_check import ItemCheck, coverage_problems, manifest_problems, unfilled_problems
from .files import check_extent, extent_fits, open_data_file
from .item_reader import (
    Checker,
    ItemLoader,
    PipelinedChecker,
    StoredRead,
    group_reads,
    load_stored_item,
    read_blob,
    split_runs,
)
from .lifecycle import CheckpointState, checkpoint_state
from .read_batches import BufferInput, batchable, batches, span
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
        self._file_ends: dict[str, int] = {}  # data file -> where its last indexed item ends
        self._listed_sizes: dict[str, int] = {}  # file -> size, from the listing read_metadata made
        self.storage_data: dict[MetadataIndex, Any] = {}
        self.bytes_read = 0  # data bytes read from storage (stored items, not the metadata files)
        self._known: Metadata | None = None
        self._item_check: ItemCheck | None = None
        self.reset(url)

    # --- DCP StorageReader protocol ----------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.url = os.fspath(checkpoint_id)
            self.backend, self.path = open_backend(self.url, self.storage_options)
            self._known = None
            self._item_check = None
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
        if metadata is self._known and manifest is self.manifest and records is self.records:
            return  # this reader read them itself: its lookups are built already
        self._known = metadata
        self.use_records(manifest, records)

    def use_records(self, manifest: CheckpointManifest | None, records: Sequence[ItemRecord]) -> None:
        self.manifest, self.records = manifest, list(records)
        self._record_at = {}
        self._file_ends = {}
        for r in self.records:  # one pass: thousands of rows
            self._record_at[(r.file, r.offset)] = r  # r.location
            end = r.offset + r.length
            if end > self._file_ends.get(r.file, -1):
                self._file_ends[r.file] = end

    def _read_metadata_files(self) -> Metadata:
        # One listing says what the checkpoint holds and how long each data file is (opening a file
        # then needs no request of its own on object stores).
        self._listed_sizes = self.backend.list_sizes(self.path)
        state = checkpoint_state(self.backend, self.path, names=self._listed_sizes)
        where = redact_url(self.url)
        if state is CheckpointState.MISSING:
            raise CheckpointNotFoundError(f"no checkpoint at {where}")
        if state is CheckpointState.PARTIAL:
            raise CheckpointNotFoundError(
                f"checkpoint {where} was never committed (a save is running or crashed, or its commit marker was "
                "removed); it cannot be loaded")
        if state is CheckpointState.COMMITTED:
            files = RecordFiles.read(self.backend, self.path)
            manifest, problems = record_problems(files, where)
            if not self.verify_checksums:
                problems = [p for p in problems if p.kind not in _CHECKSUM_KINDS]
            raise_if_problems(problems)
            # An absent or unreadable manifest or .metadata is a problem of a kind raised just above.
            assert manifest is not None and files.metadata is not None, "record_problems let a missing record pass"
            metadata_bytes = files.metadata
            records, problems = parse_index(files.index, where)
            raise_if_problems(problems)
            raise_if_problems(manifest_problems(manifest, records, where))
            self.use_records(manifest, records)
        else:  # plain DCP checkpoint: no records of ours to check against
            metadata_bytes = self._read_file(METADATA_FILE)
        metadata = load_dcp_metadata(metadata_bytes, name=f"{where}/{METADATA_FILE}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        elif state is CheckpointState.LEGACY and written_by_dcp_forge(metadata.storage_meta):
            raise IntegrityError(stripped_checkpoint_message(where))
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        where = redact_url(self.url)
        if not isinstance(metadata.storage_data, dict):
            raise IntegrityError(f"{where}/{METADATA_FILE} has no storage locations")
        raise_if_problems(storage_location_problems(metadata, where))
        self.storage_data = metadata.storage_data
        # A dcp_forge checkpoint (it has a manifest) is checked against its index; a plain DCP one only
        # against .metadata itself.
        self._item_check = ItemCheck(metadata, self.records if self.manifest is not None else None, where,
                                     by_location=self._record_at)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self._read_stored(self.plan_reads(plan, planner), planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    # --- helpers ----------------------------------------------------------------------------
    def plan_reads(self, plan: LoadPlan, planner: LoadPlanner) -> list[StoredRead]:
        """The stored items ``plan`` reads, grouped and in file order, once the records are proven to
        describe them exactly (raises before anything is read or filled).

        Every tensor the load fills (each one the plan reads, and each one the planner asked for,
        including those no stored chunk overlaps at all) must be tiled exactly by its stored chunks
        (a copy that holds part of a tensor: the part this rank loads must be filled completely),
        and every stored location must be what the index records for that item (cross_check.py).
        """
        if self._known is None or self._item_check is None:
            raise RuntimeError("DCP called read_data before read_metadata and set_up_storage_reader")
        requested = {item.storage_index.fqn for item in plan.items}
        requested.update(getattr(planner, "state_dict", None) or ())  # DefaultLoadPlanner's flat destination keys
        where = redact_url(self.url)
        raise_if_problems(coverage_problems(self._known, requested, where))
        raise_if_problems(unfilled_problems(self._known, plan.items, getattr(planner, "state_dict", None) or {},
                                            where))
        return group_reads(plan.items, self.storage_data, self._record_at, self._item_check)

    @property
    def checker(self) -> Checker:
        """What verifies a stored item's checksum (None when there is nothing to verify against)."""
        return self._verify if self.verify_checksums and self._record_at else None

    def _read_stored(self, reads: Sequence[StoredRead], planner: LoadPlanner,
                     load: ItemLoader = load_stored_item) -> None:
        """Read stored items (in file order) on up to ``thread_count`` threads, ``load`` applying each."""
        runs = split_runs(reads, self.read_threads(reads))
        if not runs:
            return
        opened = self._open_data_files(reads)
        try:
            with ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="forge-hash") as hashers:
                check = self.checker
                if check is not None:
                    check = PipelinedChecker(check, hashers)
                if len(runs) == 1:
                    self.bytes_read += self._read_run(runs[0], planner, load, check, opened)
                else:
                    with ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="forge-read") as pool:
                        for f in [pool.submit(self._read_run, run, planner, load, check, opened) for run in runs]:
                            self.bytes_read += f.result()
                # After a read error, leaving this block still waits for the hashes (they read destination
                # memory), and the read error is the one raised.
                if check is not None:
                    check.wait()
        finally:
            for handle in list(opened.values()):  # the files no run took over
                handle.close()

    def read_threads(self, reads: Sequence[StoredRead]) -> int:
        """How many threads read ``reads``: ``thread_count``, but one where every item is small and the
        files are local. Threads pay off for what storage serves slowly (large reads, each thread issuing
        its own; an object store's round trips); small items applied from memory, with the kernel reading
        the file ahead, are the interpreter's work, which a second thread only contends for."""
        if isinstance(self.backend, LocalBackend) and all(batchable(read) for read in reads):
            return 1
        return self.thread_count

    def _open_data_files(self, reads: Sequence[StoredRead]) -> dict[str, InputFile]:
        """Open every data file ``reads`` need, before anything is read, and prove each one: a plain file
        inside the checkpoint (open_data_file), holding every extent read from it, and (dcp_forge
        checkpoints) exactly as long as the index says (a file appended to or cut short was replaced or
        damaged). The runs that read take these handles over (one open per file: on object storage an
        open is a round trip)."""
        where = redact_url(self.url)
        by_file: dict[str, list[StoredRead]] = defaultdict(list)
        for read in reads:
            by_file[read.file].append(read)
        opened: dict[str, InputFile] = {}

        def open_file(name: str) -> None:
            opened[name] = open_data_file(self.backend, self.path, name, where, by_file[name][0].describe(),
                                          size=self._listed_sizes.get(name))

        try:
            with ThreadPoolExecutor(max_workers=min(self.thread_count, len(by_file)),
                                    thread_name_prefix="forge-open") as pool:
                for f in [pool.submit(open_file, name) for name in by_file]:
                    f.result()
            for name, its in by_file.items():
                size = opened[name].size()
                for read in its:
                    if not extent_fits(size, read.offset, read.length):  # describes the item only to refuse it
                        check_extent(where, name, size, read.offset, read.length, read.describe())
                end = self._file_ends.get(name)
                if end is not None and size < end:
                    raise IntegrityError(f"{where}: data file {name} is truncated: it has {size} bytes, the items "
                                         f"{INDEX_FILE} records in it end at byte {end}")
                if end is not None and size > end:
                    raise IntegrityError(f"{where}: data file {name} has {size - end} bytes after its last item "
                                         f"(ends at {end}, file has {size}): it was appended to or replaced")
        except BaseException:
            for handle in opened.values():
                handle.close()
            raise
        return opened

    def _read_file(self, name: str) -> bytes:
        try:
            return self.backend.read_bytes(self.backend.join(self.path, name))
        except FileNotFoundError as err:
            raise IntegrityError(f"{redact_url(self.url)} is missing {name}") from err

    def _read_run(self, run: Sequence[StoredRead], planner: LoadPlanner, load: ItemLoader = load_stored_item,
                  check: Checker = None, opened: dict[str, InputFile] | None = None) -> int:
        """Read consecutive stored items (one thread), one open handle per file, taken over from
        ``opened`` where it holds one (else opened here); returns bytes read.

        Small items next to each other are read together, with one request (``batches``), and applied
        from memory. The next ``PREFETCH_BYTES`` of the run are always requested ahead
        (``InputFile.prefetch``), so the disk keeps working while this thread verifies and places the
        current item.
        """
        handles: dict[str, InputFile] = {}
        done = 0
        ahead = 0  # groups[:ahead] have been prefetched
        where = redact_url(self.url)
        groups = batches(run)

        def handle_for(read: StoredRead) -> InputFile:
            handle = handles.get(read.file)
            if handle is None:
                handle = (opened or {}).pop(read.file, None)  # dict.pop is atomic: runs share ``opened``
                if handle is None:
                    handle = open_data_file(self.backend, self.path, read.file, where, read.describe())
                handles[read.file] = handle
            return handle

        trailers = _trailer_runs(groups)
        try:
            for i, group in enumerate(groups):
                window_end = group[0].offset + PREFETCH_BYTES
                while ahead < len(groups) and (ahead <= i or (groups[ahead][0].file == group[0].file
                                                              and groups[ahead][0].offset < window_end)):
                    nxt = groups[ahead]
                    run_of_trailers = trailers.get(ahead)
                    if run_of_trailers is not None:  # only its trailer is read before its bytes
                        if run_of_trailers[0] == ahead:  # the first of the run: fetch them all
                            handle_for(nxt[0]).prefetch(run_of_trailers[1], run_of_trailers[2])
                    elif check is not None or len(nxt) > 1 or nxt[0].layout is None:  # else only tensor bytes are read
                        handle_for(nxt[0]).prefetch(*span(nxt))
                    ahead += 1
                try:
                    handle = handle_for(group[0])
                    if len(group) > 1 or (group[0].gap is not None and batchable(group[0])):  # applied from memory
                        start, length = span(group)
                        handle = BufferInput(read_blob(handle, start, length), start)
                    for read in group:
                        load(handle, read, planner, check)
                        done += read.stored_bytes
                except EOFError as err:
                    raise IntegrityError(f"{redact_url(self.url)}: data file {group[0].file} is truncated "
                                         f"({err}); it holds {group[0].fqn!r}") from err
        finally:
            for handle in handles.values():
                handle.close()
        return done

    def _verify(self, read: StoredRead, found: str) -> None:
        self.verify_stored(read.file, read.offset, read.fqn, found)

    def verify_stored(self, file: str, offset: int, fqn: str, found: str) -> None:
        """Raise IntegrityError unless ``found`` is the index's checksum of the item at ``offset`` of ``file``."""
        record = self._record_at.get((file, offset))
        if record is None:
            raise IntegrityError(f"{redact_url(self.url)}: {file}@{offset} ({fqn!r}) is not in {INDEX_FILE}")
        if found != record.checksum:
            raise IntegrityError(
                f"{redact_url(self.url)}: checksum mismatch in {file} at byte {offset} for component "
                f"{record.component!r} ({fqn!r}): expected {record.checksum}, found {found}")



def _trailer_runs(groups: Sequence[Sequence[StoredRead]]) -> dict[int, tuple[int, int, int]]:
    """For each group that is one large packed tensor (read straight into place after its trailer), the
    run of such groups whose trailers lie one after the other (the items of one large pack): group
    index -> (index of the run's first group, offset, length of the run's trailers)."""
    runs: dict[int, tuple[int, int, int]] = {}
    members: list[int] = []
    file, start, end = None, 0, 0

    def close() -> None:
        for i in members:
            runs[i] = (members[0], start, end - start)

    for i, group in enumerate(groups):
        read = group[0]
        if len(group) != 1 or read.gap is None or batchable(read):
            continue
        (tail_at, tail_length) = read.pieces[-1]
        if members and read.file == file and tail_at == end:
            members.append(i)
            end = tail_at + tail_length
            continue
        close()
        members, file, start, end = [i], read.file, tail_at, tail_at + tail_length
    close()
    return runs
