"""The drain: copying a checkpoint committed in the local tier to the remote tier, with its own commit.

A drain reuses the storage layer's protocol rather than a second one: the remote directory is claimed
(``_CLAIMED``, exclusively, with the save's own id), every data file is streamed from a node copy to
the remote backend by one rank and checked item by item against the index on the way
(``storage.verified_copy``; a file is completed remotely only once all of it checked out), the ranks
agree that every upload completed, then rank 0 writes the shared records (byte for byte the local
ones, after checking their checksum chain against the commit record), the remote ``_TIER`` record,
and last ``_COMMITTED`` with the very commit record of the local save. So a drained copy is never
committed before all its bytes are durable remotely, is an ordinary checkpoint for every reader, and
says by its save id (``_COMMITTED``, ``.metadata``) and ``_TIER`` that it is a drained copy of that save.
A failed drain removes what it wrote (its claim last); a crashed one leaves an uncommitted remote
directory that no load sees and the next resume removes before draining the checkpoint again.

``Drainer`` runs one drain at a time on a thread and a process group of its own, so training and the
next saves go on meanwhile; starting a drain waits for the previous one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .. import collectives, teardown
from ..errors import DrainError, IntegrityError, os_error_context
from ..format.index import ItemRecord
from ..format.names import INDEX_FILE, MANIFEST_FILE, METADATA_FILE, TIER_FILE
from ..format.tier_record import REMOTE, TierRecord
from ..storage import (
    CommitRecord,
    ItemVerifier,
    RecordFiles,
    claim,
    commit,
    copy_verified,
    discard_claimed,
    file_sizes,
    join_url,
    open_backend,
    raise_if_problems,
    record_problems,
    redact_url,
    rows_by_file,
)
from .site import TierSite

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainJob:
    """One checkpoint to drain: its committed records, its index, and who uploads each data file
    (``uploads``: file -> rank, a rank whose node copy holds the file)."""

    checkpoint_id: str
    commit: CommitRecord
    records: RecordFiles
    rows: tuple[ItemRecord, ...]
    uploads: Mapping[str, int]


@dataclass(frozen=True)
class DrainStats:
    checkpoint_id: str
    bytes_uploaded: int  # by this rank
    seconds: float


def drain(job: DrainJob, site: TierSite, group: Any, output_dir: str, storage_options: Mapping[str, Any],
          thread_count: int = 2) -> DrainStats:
    """Copy ``job``'s checkpoint from the local tier to ``output_dir`` and commit it there. Collective
    over ``group``; raises the lowest failing rank's error on every rank (nothing committed then)."""
    started = time.perf_counter()
    url = join_url(output_dir, job.checkpoint_id)
    backend, path = open_backend(url, storage_options)
    where = redact_url(url)
    local_backend, local_path = site.backend(), site.copy_path(job.checkpoint_id)
    sizes = file_sizes(job.rows)
    rows = rows_by_file(job.rows)
    mine = sorted(name for name, rank in job.uploads.items() if rank == site.rank)

    def check_records() -> None:
        files = RecordFiles(job.commit.to_bytes(), job.records.manifest, job.records.metadata, job.records.index)
        raise_if_problems(record_problems(files, f"{site.copy_path(job.checkpoint_id)} (local tier)")[1])
        claim(backend, path, job.commit.save_id, url)

    collectives.run_on(group, 0, check_records)
    try:
        def upload(name: str) -> int:
            with os_error_context(f"rank {site.rank} draining {name} of {job.checkpoint_id} to {where}",
                                  backend.join(path, name)):
                source = local_backend.open_input(local_backend.join(local_path, name))
                try:
                    return copy_verified(source, backend.open_output(backend.join(path, name)),
                                         ItemVerifier(f"{local_path} (local tier)", name, rows.get(name, ()),
                                                      sizes[name]))
                finally:
                    source.close()

        def upload_mine() -> int:
            if not mine:
                return 0
            with ThreadPoolExecutor(max_workers=min(thread_count, len(mine)), thread_name_prefix="forge-drain") as pool:
                return sum(pool.map(upload, mine))

        uploaded = collectives.on_every_rank(group, upload_mine)  # every rank stops together on a failure

        def finish() -> None:
            tier = TierRecord(tier=REMOTE, checkpoint_id=job.checkpoint_id, save_id=job.commit.save_id,
                              data_files=sizes)
            records = job.records  # all present: check_records refused a copy missing any, before uploading
            assert records.index is not None and records.metadata is not None and records.manifest is not None
            with os_error_context(f"rank 0 committing the drained copy {where}", path):
                for name, data in ((INDEX_FILE, records.index), (METADATA_FILE, records.metadata),
                                   (MANIFEST_FILE, records.manifest), (TIER_FILE, tier.to_bytes())):
                    backend.write_bytes(backend.join(path, name), data)
                backend.sync_dir(path)
                present = set(backend.list_dir(path))
                lost = sorted(set(sizes) - present)
                if lost:
                    raise IntegrityError(f"not committing the drained copy {where}: its uploads completed, but "
                                         f"{', '.join(lost[:4])} are not there")
                commit(backend, path, job.commit)

        collectives.run_on(group, 0, finish)
    except BaseException as err:
        if site.rank == 0:
            try:
                discard_claimed(backend, path, job.commit.save_id)
            except Exception as cleanup_error:  # noted on the drain's error, which is raised
                err.add_note(f"removing the uncommitted {where} failed too ({cleanup_error}); the next resume "
                             "removes it")
        raise
    seconds = time.perf_counter() - started
    if site.rank == 0:
        logger.info("drained %s to the remote tier %s (%d files, %.3fs)", job.checkpoint_id, where, len(sizes),
                    seconds)
    return DrainStats(job.checkpoint_id, uploaded, seconds)


class Drainer:
    """Runs drains one at a time on a background thread, collectively over ``group`` (a gloo group of
    its own: every rank submits the same drains in the same order).

    A failed drain is remembered until raised: by ``raise_failures`` (collective, at the start of the
    next save) or by ``close``. ``busy`` names the checkpoint being drained: local retention keeps it.
    """

    def __init__(self, group: Any, rank: int) -> None:
        self.group = group
        self.rank = rank
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._busy: str | None = None
        self._failed: dict[str, BaseException] = {}
        self._raised: set[str] = set()
        self.last: DrainStats | None = None
        self.closed = False
        teardown.register(self)

    def submit(self, checkpoint_id: str, run: Callable[[], DrainStats]) -> None:
        """Start draining ``checkpoint_id`` (``run`` does it) once the previous drain finished."""
        self.wait()
        if self.closed:
            raise ValueError(f"the drainer of rank {self.rank} is closed")

        def work() -> None:
            try:
                self.last = run()
            except BaseException as err:
                logger.error("rank %d: draining %s to the remote tier failed: %s: %s", self.rank, checkpoint_id,
                             type(err).__name__, err)
                with self._lock:
                    self._failed[checkpoint_id] = err
            finally:
                with self._lock:
                    self._busy = None

        with self._lock:
            self._busy = checkpoint_id
        self._thread = threading.Thread(target=work, name=f"forge-drain-{checkpoint_id}", daemon=True)
        self._thread.start()

    def busy(self) -> set[str]:
        with self._lock:
            return {self._busy} if self._busy is not None else set()

    def wait(self) -> None:
        """Block until the drain in flight (if any) finished. Local."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def raise_failures(self, group: Any) -> None:
        """Collective over ``group`` (the caller's foreground group): if a drain failed on any rank and was
        not raised yet, every rank raises DrainError for it now (each failure once)."""
        with self._lock:
            mine = sorted(set(self._failed) - self._raised)
        failed = sorted({c for ids in collectives.all_gather(group, mine) for c in ids})
        if not failed:
            return
        with self._lock:
            self._raised.update(failed)
            cause = next((self._failed[c] for c in failed if c in self._failed), None)
        raise DrainError(f"draining {', '.join(failed)} to the remote tier failed (still committed in the local "
                         f"tier): {cause!r}" if cause is not None else
                         f"draining {', '.join(failed)} to the remote tier failed on another rank (still committed "
                         "in the local tier)") from cause

    def close(self, raise_failure: bool = True) -> None:
        """Wait for the drain in flight; raise DrainError for a failure nobody raised yet. Idempotent."""
        if self.closed:
            return
        self.wait()
        self.closed = True
        teardown.unregister(self)
        with self._lock:
            unraised = sorted(set(self._failed) - self._raised)
            self._raised.update(unraised)
        if unraised and raise_failure:
            cause = self._failed[unraised[0]]
            raise DrainError(f"draining {', '.join(unraised)} to the remote tier failed (still committed in the "
                             f"local tier): {cause!r}") from cause

    # --- teardown.Settling ------------------------------------------------------------------------
    def has_save_in_flight(self) -> bool:
        return bool(self.busy())

    def uses_group(self, group: Any) -> bool:
        return group is None or group is self.group

    def settle_quietly(self) -> None:
        try:
            self.wait()
        except BaseException:  # never raise during teardown
            logger.exception("rank %d: waiting for the drain at teardown failed", self.rank)


def uploads_at_save(files: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Right after a save, each rank drains the files it wrote (they are in its node's copy)."""
    return {name: writer for name, (writer, _) in files.items()}

