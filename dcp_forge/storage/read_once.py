"""Read-once loading: each stored item is read from storage by one rank; the others get it over gloo.

When many ranks load the same bytes (GLOBAL and REPLICATED state, PER_GROUP / PER_NODE copies,
replicated DTensor shards), plain DCP has every rank read them: W ranks pull W times the checkpoint
from storage. Here the coordinator's global plan gives each stored item needed by at least
``min_replicas`` ranks one reader among the ranks that need it, balancing bytes like the writers of
a save (``placement.place_on_least_loaded``); every rank reads its share (verifying checksums), and
then the readers send each item to the other ranks that need it, in batches grouped by (source,
receivers) so that every receiver needs every byte it gets. Job-wide, storage serves each unique
byte once; the rest travels over the coordinator's own gloo group.

Call protocol (DCP's ``StorageReader``): ``reset`` → on every rank ``read_metadata`` (or
``use_metadata``), ``set_up_storage_reader``, ``prepare_local_plan``; on the coordinator
``prepare_global_plan``, which attaches each rank's ``ReadOnceSchedule``; on every rank
``read_data``, which is collective over ``group``: every rank reads its share, all ranks agree
that every read succeeded (one all_gather), then they run the exchange batches in one global
order. A rank that failed to read makes every rank skip the exchange, and DCP reports its error.

Memory: a reader keeps the raw bytes it must send until its batches are sent (for REPLICATED state
about 1/W of the checkpoint); a rank holds at most one wave (``wave_bytes``, or one batch) of
received bytes at a time.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ..collectives import irecv, isend
from ..core.placement import place_on_least_loaded
from ..core.topology import Topology
from ..errors import ComponentDeclarationError, IntegrityError
from ..format.index import file_pieces
from ..format.names import INDEX_FILE
from .backends import InputFile, LocalBackend, StorageBackend
from .files import check_extent, open_data_file
from .item_reader import Checker, StoredRead, load_stored_item
from .read_batches import BufferInput, read_pieces
from .reader import ForgeStorageReader
from .registry import redact_url

DEFAULT_BATCH_BYTES = 64 * 1024 * 1024
DEFAULT_WAVE_BYTES = 256 * 1024 * 1024
SOLO_BYTES = 1024 * 1024  # items this big travel alone: concatenating them would cost a copy


def read_once_by_default(topology: Topology, backend: StorageBackend) -> bool:
    """Whether a load should read once when the caller does not say: when ranks share stored bytes and
    reading them once saves storage traffic.

    Ranks on one node reading a local filesystem share its page cache: the disk serves each byte about
    once anyway, and exchanging it over gloo only adds work (benchmarks/read_once.py measures it:
    slower loads on one machine). Across nodes, or from an object store or any other fsspec
    backend, every rank's read is its own request for the bytes.
    """
    return topology.world_size > 1 and (topology.num_nodes > 1 or not isinstance(backend, LocalBackend))


@dataclass(frozen=True, order=True)
class Location:
    """One stored item: a byte range of a data file, of which a packed item owns all but its ``gap``
    (offset from ``offset``, length; format/pack.py). What travels between ranks is what it owns."""

    file: str
    offset: int
    length: int
    gap: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        """The bytes the item owns (and is sent)."""
        return self.length - (self.gap[1] if self.gap is not None else 0)

    @property
    def pieces(self) -> tuple[tuple[int, int], ...]:
        """(offset in the file, length) of the bytes it owns."""
        return file_pieces(self.offset, self.length, self.gap)


@dataclass(frozen=True)
class ExchangeBatch:
    """Stored items ``source`` read and sends, concatenated, to each of ``receivers``, in ``wave``."""

    source: int
    receivers: tuple[int, ...]
    locations: tuple[Location, ...]
    wave: int = 0

    @property
    def nbytes(self) -> int:
        return sum(loc.nbytes for loc in self.locations)


@dataclass(frozen=True)
class ReadOnceSchedule:
    """One rank's part of a read-once load: what it reads from storage, and the job's batches."""

    reads: frozenset[Location]
    batches: tuple[ExchangeBatch, ...]


def plan_read_once(needs: Sequence[Iterable[Location]], *, min_replicas: int = 2,
                   batch_bytes: int = DEFAULT_BATCH_BYTES, wave_bytes: int = DEFAULT_WAVE_BYTES,
                   readers: Mapping[str, Collection[int]] | None = None) -> list[ReadOnceSchedule]:
    """Who reads each stored item and how the others get it (pure; ``needs[r]``: what rank r needs).

    An item needed by at least ``min_replicas`` ranks is read by one of them (the least loaded, largest
    items first) and sent to the rest; any other item is read by each rank that needs it.
    ``readers`` (data file -> the ranks that can read it; None: every rank can read every file), for
    checkpoints whose files are spread over node-local storage: an item is read only by a rank that
    can read its file, preferring the ranks that need it; if none of them can, a rank that can reads
    it for them and sends it to every rank that needs it. A file no rank can read is a ValueError. Batches
    hold items of one (source, receivers) pair, at most ``batch_bytes`` each unless one item is
    bigger. They are ordered round-robin over sources and cut into waves of at most ``wave_bytes``
    (or one batch): the batches of a wave are in flight together, so every source sends at once,
    and no rank holds more than a wave of received bytes.
    """
    for name, value, low in (("min_replicas", min_replicas, 2), ("batch_bytes", batch_bytes, 1),
                             ("wave_bytes", wave_bytes, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ComponentDeclarationError(f"{name!r} must be an int >= {low} (got {value!r})")
    world = len(needs)
    needers: dict[Location, set[int]] = defaultdict(set)
    for rank, locations in enumerate(needs):
        for loc in locations:
            needers[loc].add(rank)
    reads: list[set[Location]] = [set() for _ in range(world)]
    load = [0] * world
    shared = []
    for loc, ranks in needers.items():
        able = ranks if readers is None else ranks & set(readers.get(loc.file, ()))
        if len(ranks) < min_replicas and able == ranks:
            for r in ranks:
                reads[r].add(loc)
                load[r] += loc.nbytes
            continue
        candidates = able or set(readers.get(loc.file, ()) if readers is not None else ())
        if not candidates:
            raise ValueError(f"read-once: no rank can read data file {loc.file} (needed by ranks {sorted(ranks)})")
        shared.append((loc.nbytes, loc, loc, tuple(sorted(candidates))))
    grouped: dict[tuple[int, tuple[int, ...]], list[Location]] = defaultdict(list)
    for loc, reader in place_on_least_loaded(shared, load).items():
        reads[reader].add(loc)
        grouped[(reader, tuple(sorted(needers[loc] - {reader})))].append(loc)
    per_source: dict[int, list[ExchangeBatch]] = defaultdict(list)
    for (source, receivers), locations in sorted(grouped.items()):
        for chunk in _cut(sorted(locations), batch_bytes):
            per_source[source].append(ExchangeBatch(source, receivers, chunk))
    interleaved = [queue[i] for i in range(max(map(len, per_source.values()), default=0))
                   for _, queue in sorted(per_source.items()) if i < len(queue)]
    batches = []
    wave, size = 0, 0
    for batch in interleaved:
        if size and size + batch.nbytes > wave_bytes:
            wave, size = wave + 1, 0
        size += batch.nbytes
        batches.append(dataclasses.replace(batch, wave=wave))
    shared_batches = tuple(batches)
    return [ReadOnceSchedule(frozenset(r), shared_batches) for r in reads]


def _cut(locations: Sequence[Location], limit: int) -> list[tuple[Location, ...]]:
    """Consecutive pieces of at most ``limit`` bytes. A location of ``SOLO_BYTES`` or more is a piece
    of its own: it is sent as it was read, without being copied into a concatenation."""
    pieces: list[tuple[Location, ...]] = [(loc,) for loc in locations if loc.nbytes >= SOLO_BYTES]
    current: list[Location] = []
    size = 0
    for loc in (loc for loc in locations if loc.nbytes < SOLO_BYTES):
        if current and size + loc.nbytes > limit:
            pieces.append(tuple(current))
            current, size = [], 0
        current.append(loc)
        size += loc.nbytes
    if current:
        pieces.append(tuple(current))
    return pieces


class ReadOnceStorageReader(ForgeStorageReader):
    """A ``ForgeStorageReader`` that reads each stored item once per job and exchanges it over ``group``.

    ``group``: the process group DCP's load runs over (the coordinator's gloo group); the ranks of
    the load plans are ranks of this group. ``min_replicas`` / ``batch_bytes`` / ``wave_bytes`` /
    ``readers``: see ``plan_read_once`` (with ``readers``, each rank's ``url`` is its own node's part
    of a checkpoint spread over node-local storage, and a rank may read items only others need).
    ``bytes_received`` counts what this rank got from other ranks instead of storage.
    """

    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                 group: Any, thread_count: int = 2, verify_checksums: bool = True, min_replicas: int = 2,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, wave_bytes: int = DEFAULT_WAVE_BYTES,
                 readers: Mapping[str, Collection[int]] | None = None) -> None:
        super().__init__(url, storage_options, thread_count=thread_count, verify_checksums=verify_checksums)
        plan_read_once([], min_replicas=min_replicas, batch_bytes=batch_bytes, wave_bytes=wave_bytes)  # validates
        self.group = group
        self.min_replicas = min_replicas
        self.batch_bytes = batch_bytes
        self.wave_bytes = wave_bytes
        self.readers = None if readers is None else {name: frozenset(ranks) for name, ranks in readers.items()}
        self.bytes_received = 0

    def _location(self, item: ReadItem) -> Location:
        info = self.storage_data[item.storage_index]
        record = self._record_at.get((info.relative_path, info.offset))
        gap = None
        if record is not None and record.gap_offset is not None and record.gap_length is not None:
            gap = (record.gap_offset, record.gap_length)
        return Location(info.relative_path, info.offset, info.length, gap)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        needs = [[self._location(item) for item in plan.items] for plan in plans]
        schedules = plan_read_once(needs, min_replicas=self.min_replicas, batch_bytes=self.batch_bytes,
                                   wave_bytes=self.wave_bytes, readers=self.readers)
        return [dataclasses.replace(plan, storage_data=s) for plan, s in zip(plans, schedules, strict=True)]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        schedule = plan.storage_data
        if not isinstance(schedule, ReadOnceSchedule):
            raise ComponentDeclarationError(
                "ReadOnceStorageReader.read_data got a plan without a read-once schedule: DCP must call "
                "prepare_global_plan on the coordinator first (dcp.load does)")
        me = dist.get_rank(self.group)
        reads: dict[Location, StoredRead] = {}
        to_send = {loc for b in schedule.batches if b.source == me for loc in b.locations}
        kept: dict[Location, torch.Tensor] = {}

        def load(handle: InputFile, read: StoredRead, planner: LoadPlanner, check: Checker) -> None:
            location = Location(read.file, read.offset, read.length, read.gap)
            if location not in to_send:
                load_stored_item(handle, read, planner, check)
                return
            # Other ranks need these bytes too: keep them as stored, then apply them from memory.
            held = read_pieces(handle, location.pieces)
            load_stored_item(held, read, planner, check)
            kept[location] = held.data

        failure: BaseException | None = None
        try:
            # The checks of what this rank needs (cross_check.py) run before it reads or receives anything.
            reads.update({Location(r.file, r.offset, r.length, r.gap): r for r in self.plan_reads(plan, planner)})
            self._read_stored(sorted((reads[loc] for loc in schedule.reads if loc in reads), key=_file_order),
                              planner, load)
            kept.update(self._read_for_others(sorted(loc for loc in schedule.reads if loc not in reads)))
        except Exception as err:  # reported after the other ranks learn of it, so nobody waits forever
            failure = err
        everyone_ok: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone_ok, failure is None, group=self.group)
        if failure is not None:
            raise failure
        if all(everyone_ok):  # else a rank failed: DCP gathers and raises its error on every rank
            failure = self._exchange(schedule.batches, me, kept, reads, planner)
            if failure is not None:
                raise failure
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_for_others(self, locations: Sequence[Location]) -> dict[Location, torch.Tensor]:
        """Stored items this rank reads only to send (``readers``: no rank that needs them can read their
        file), as stored, each checked against its index checksum before it is sent."""
        if not locations:
            return {}
        where = redact_url(self.url)
        by_file: dict[str, list[Location]] = defaultdict(list)
        for loc in locations:
            by_file[loc.file].append(loc)

        def read_file(name: str) -> dict[Location, torch.Tensor]:
            out = {}
            handle = open_data_file(self.backend, self.path, name, where, "items other ranks load")
            try:
                size = handle.size()
                end = self._file_ends.get(name)
                if end is not None and size != end:
                    raise IntegrityError(f"{where}: data file {name} has {size} bytes, the items {INDEX_FILE} "
                                         f"records in it end at byte {end}")
                for loc in by_file[name]:
                    record = self._record_at.get((loc.file, loc.offset))
                    fqn = record.fqn if record is not None else f"the item at byte {loc.offset}"
                    check_extent(where, name, size, loc.offset, loc.length, repr(fqn))
                    held = read_pieces(handle, loc.pieces).data  # what the item owns, as it is sent
                    if self.verify_checksums:
                        self.verify_stored(name, loc.offset, fqn, xxhash.xxh3_64_hexdigest(held.numpy().data))
                    out[loc] = held
            finally:
                handle.close()
            return out

        kept: dict[Location, torch.Tensor] = {}
        with ThreadPoolExecutor(max_workers=min(self.thread_count, len(by_file)),
                                thread_name_prefix="forge-read") as pool:
            for result in pool.map(read_file, sorted(by_file)):
                kept.update(result)
        self.bytes_read += sum(loc.nbytes for loc in locations)
        return kept

    def _exchange(self, batches: Sequence[ExchangeBatch], me: int, kept: dict[Location, torch.Tensor],
                  reads: Mapping[Location, StoredRead], planner: LoadPlanner) -> BaseException | None:
        """Run every wave in the shared order: post this rank's sends and receives of the wave, apply
        what arrives, wait for the sends. Keeps communicating after a local failure (so no peer
        blocks on it) and returns the first failure."""
        failure: BaseException | None = None
        waves: dict[int, list[tuple[int, ExchangeBatch]]] = defaultdict(list)
        for tag, batch in enumerate(batches):  # the batch's index tags its messages
            waves[batch.wave].append((tag, batch))
        for wave in sorted(waves):
            sends, receives = [], []
            for tag, batch in waves[wave]:
                if batch.source == me:
                    payload, missing = self._payload(batch, kept)
                    failure = failure or missing
                    sends += [isend(payload, self.group, r, tag) for r in batch.receivers]
                elif me in batch.receivers:
                    payload = torch.empty(batch.nbytes, dtype=torch.uint8)
                    receives.append((batch, payload,
                                     irecv(payload, self.group, batch.source, tag)))
            for batch, payload, work in receives:
                work.wait()
                self.bytes_received += batch.nbytes
                if failure is None:
                    try:
                        self._apply_received(payload, batch.locations, reads, planner)
                    except Exception as err:
                        failure = err
            for work in sends:
                work.wait()
        return failure

    @staticmethod
    def _payload(batch: ExchangeBatch, kept: dict[Location, torch.Tensor]) -> tuple[torch.Tensor, Exception | None]:
        """The batch's stored bytes, concatenated (freeing what was kept for it)."""
        if len(batch.locations) == 1 and batch.locations[0] in kept:
            return kept.pop(batch.locations[0]), None
        payload = torch.empty(batch.nbytes, dtype=torch.uint8)
        missing = None
        start = 0
        for loc in batch.locations:
            buffer = kept.pop(loc, None)
            if buffer is not None:
                payload[start:start + loc.nbytes] = buffer
            elif missing is None:
                missing = RuntimeError(f"read-once: rank {batch.source} has no bytes of {loc} to send")
            start += loc.nbytes
        return payload, missing

    def _apply_received(self, payload: torch.Tensor, locations: Sequence[Location],
                        reads: Mapping[Location, StoredRead], planner: LoadPlanner) -> None:
        start = 0
        for loc in locations:
            # Checked again against the index: the bytes crossed the network.
            load_stored_item(BufferInput(payload[start:start + loc.nbytes], pieces=loc.pieces), reads[loc], planner,
                             self.checker)
            start += loc.nbytes


def _file_order(read: StoredRead) -> tuple[str, int]:
    return (read.file, read.offset)
