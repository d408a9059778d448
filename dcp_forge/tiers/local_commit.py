"""Saving into the local tier: claim every node copy, write, copy to peers, then commit.

What "committed in the local tier" means (docs/TIERS.md): a save is committed there from the moment
the first node copy holds its ``_COMMITTED``. The protocol, every rank together:

1. ``claim_node_copies``: every node's leader claims its node copy (``_CLAIMED``, exclusively, under the
   save id the ranks agreed on). If any claim fails, every claim of this save is released.
2. DCP's save (``NodeLocalWriter``): each rank writes its data files into its own node's copy (each
   fsynced, then the directory); DCP's coordinator writes index, ``.metadata`` and manifest into its
   node copy and hands the commit record back instead of committing.
3. ``commit_local``: the records travel to every rank; each rank's data files are copied to its
   ``peer_copies`` partners on other nodes (peer_copy.py, checked item by item); every other node's
   leader writes the records into its copy; every leader writes its copy's ``_TIER`` and syncs the
   directory. The ranks agree that all of this succeeded, and only then rank 0 creates ``_COMMITTED``
   in its node copy: **the commit point**. The other leaders then create theirs (the same bytes).

A failure before the commit point removes every node copy of the save (its claims last); a crash
leaves uncommitted node copies, which no load ever uses and the next resume removes. A crash after
the commit point leaves node copies without their marker but with their ``_TIER``: they are part of
the committed save (their save id says so), and loads use their files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import collectives
from ..errors import os_error_context
from ..format.index import ItemRecord
from ..format.names import INDEX_FILE, MANIFEST_FILE, METADATA_FILE, TIER_FILE
from ..format.tier_record import LOCAL, TierRecord
from ..rank_exchange import RankExchange
from ..storage import (
    CommitRecord,
    ForgeStorageWriter,
    RecordFiles,
    claim,
    claimant,
    commit,
    discard_claimed,
    parse_index,
    raise_if_problems,
    redact_url,
    rows_by_file,
)
from .layout import Transfer, peer_transfers
from .peer_copy import PeerCopyStats, copy_to_peers
from .site import TierSite

logger = logging.getLogger(__name__)


class NodeLocalWriter(ForgeStorageWriter):
    """The DCP storage writer of one node's copy of a local-tier checkpoint (this rank's node).

    Differs from ``ForgeStorageWriter`` only in the directory's lifecycle: the node copies were claimed
    before the save under the agreed ``save_id`` (``claim_node_copies``), the coordinator keeps the
    commit record in ``commit_record`` instead of committing (``commit_local`` commits), and a failed
    save is removed from every node by that node's leader.
    """

    def __init__(self, url: str, save_id: str, site: TierSite, *, thread_count: int = 2,
                 extra: Mapping[str, Any] | None = None, training_args_hash: str | None = None,
                 commit_gate: Callable[[], None] | None = None, exchange: RankExchange | None = None) -> None:
        self._agreed_save_id = save_id
        self.site = site
        self.commit_record: CommitRecord | None = None
        super().__init__(url, None, thread_count=thread_count, extra=extra, training_args_hash=training_args_hash,
                         commit_gate=commit_gate, exchange=exchange)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        self.save_id = self._agreed_save_id

    def claim_directory(self) -> None:
        """Claimed on every node before the save began."""

    def commit_directory(self, record: CommitRecord) -> bool:
        self.commit_record = record
        return False

    def outcome(self) -> Any:
        return self.manifest, self.commit_record

    def adopt_outcome(self, outcome: Any) -> None:
        self.manifest, self.commit_record = outcome

    def discard_failed_save(self, error: BaseException, group: Any = None) -> None:
        """Every node's leader removes its node's copy of the failed save; collective over ``group``."""
        if self.site.leader:
            try:
                discard_claimed(self.backend, self.path, self.save_id)
            except Exception as cleanup_error:  # noted on the save's error, which the caller raises
                error.add_note(f"removing the local tier's copy on node {self.site.node} failed too "
                               f"({type(cleanup_error).__name__}: {cleanup_error}); the next resume removes it")
        if group is not None:
            collectives.all_gather(group, None)


def claim_node_copies(site: TierSite, group: Any, checkpoint_id: str, save_id: str) -> None:
    """Step 1: every node's leader claims its node copy; if any claim fails, every claim is released
    and every rank raises the failure. Collective over ``group``."""
    backend, path = site.backend(), site.copy_path(checkpoint_id)

    def claim_mine() -> None:
        if site.leader:
            claim(backend, path, save_id, path)

    try:
        collectives.on_every_rank(group, claim_mine)
    except BaseException:
        release_node_copy(site, checkpoint_id, save_id)
        raise


def release_node_copy(site: TierSite, checkpoint_id: str, save_id: str) -> None:
    """This node's leader removes its uncommitted copy of save ``save_id`` (best effort: a copy left
    behind is removed by the next resume, and never loaded)."""
    if not site.leader:
        return
    backend, path = site.backend(), site.copy_path(checkpoint_id)
    try:
        if claimant(backend, path) == save_id:
            discard_claimed(backend, path, save_id)
    except OSError:
        logger.warning("could not remove the uncommitted local copy %s of a failed save; the next resume "
                       "removes it", path, exc_info=True)


@dataclass(frozen=True)
class LocalCommit:
    """A save committed in the local tier, as this rank knows it afterwards."""

    checkpoint_id: str
    commit: CommitRecord
    records: RecordFiles  # the shared records, as committed
    rows: tuple[ItemRecord, ...]  # the index
    files: Mapping[str, tuple[int, int]]  # data file -> (writer rank, bytes)
    tier: TierRecord  # this node's tier record
    peer_copy: PeerCopyStats
    seconds: float


def files_of(rows: Sequence[ItemRecord]) -> dict[str, tuple[int, int]]:
    """Every data file the index names: its writer rank and its length."""
    files: dict[str, tuple[int, int]] = {}
    for r in rows:
        _, size = files.get(r.file, (r.rank, 0))
        files[r.file] = (r.rank, max(size, r.offset + r.length))
    return dict(sorted(files.items()))


def node_tier_record(site: TierSite, checkpoint_id: str, save_id: str, files: Mapping[str, tuple[int, int]],
                     transfers: Sequence[Transfer], drain: bool) -> TierRecord:
    """What node ``site.node``'s copy holds: its ranks' own files and the peer copies it received."""
    node_of = site.topology.node_of_rank
    own = {name for name, (writer, _) in files.items() if node_of[writer] == site.node}
    copies = [t for t in transfers if node_of[t.dst] == site.node]
    return TierRecord(tier=LOCAL, checkpoint_id=checkpoint_id, save_id=save_id,
                      data_files={name: size for name, (_, size) in files.items()}, node=site.node,
                      num_nodes=site.topology.num_nodes, holds=tuple(sorted(own | {t.file for t in copies})),
                      copies_of=tuple(sorted({node_of[t.src] for t in copies})), drain=drain)


def commit_local(site: TierSite, group: Any, writer: NodeLocalWriter, checkpoint_id: str, *,
                 drain: bool) -> LocalCommit:
    """Step 3, after DCP's save returned on every rank: peer copies, records on every node, then the
    commit. Collective over ``group``; on failure every node copy of the save is removed and every
    rank raises the lowest failing rank's error."""
    started = time.perf_counter()
    save_id = writer.save_id
    backend, path, where = writer.backend, writer.path, redact_url(writer.url)
    try:
        def committed_records() -> tuple[RecordFiles, CommitRecord]:
            if writer.commit_record is None:
                raise RuntimeError(f"{where}: DCP's save returned without writing the records (no commit record)")
            return RecordFiles.read(backend, path), writer.commit_record

        records, record = collectives.run_on(group, 0, committed_records)
        rows, problems = parse_index(records.index, where)
        raise_if_problems(problems)
        files = files_of(rows)
        transfers = peer_transfers(site.topology, site.tier.peer_copies, files)
        stats, failure = copy_to_peers(transfers, site.rank, group, backend, path, rows_by_file(rows), where)
        if failure is not None:
            failure.add_note(f"while copying the local tier's files of {checkpoint_id} to peer nodes")
        collectives.agree(group, failure)
        tier = node_tier_record(site, checkpoint_id, save_id, files, transfers, drain)

        def complete_node_copy() -> None:
            if not site.leader:
                return
            with os_error_context(f"rank {site.rank} completing node {site.node}'s copy of {checkpoint_id} in "
                                  "the local tier", path):
                if site.node != site.topology.node_of_rank[0]:
                    for name, data in ((INDEX_FILE, records.index), (METADATA_FILE, records.metadata),
                                       (MANIFEST_FILE, records.manifest)):
                        backend.write_bytes(backend.join(path, name), data)
                backend.create_exclusive(backend.join(path, TIER_FILE), tier.to_bytes())
                backend.sync_dir(path)

        collectives.on_every_rank(group, complete_node_copy)

        def commit_first() -> None:  # the commit point of the local tier
            with os_error_context(f"rank 0 committing {checkpoint_id} in the local tier", path):
                commit(backend, path, record)

        collectives.run_on(group, 0, commit_first)
    except BaseException:
        release_node_copy(site, checkpoint_id, save_id)
        raise
    late = None
    if site.leader and site.rank != 0:
        try:
            commit(backend, path, record)
        except Exception as err:  # committed already (rank 0's marker); this node's copy still serves loads
            late = f"node {site.node}: {type(err).__name__}: {err}"
    lates = [m for m in collectives.all_gather(group, late) if m]
    if lates and site.rank == 0:
        logger.warning("%s is committed in the local tier, but not every node copy got its commit marker "
                       "(their files still serve loads): %s", checkpoint_id, "; ".join(lates))
    return LocalCommit(checkpoint_id, record, records, tuple(rows), files, tier, stats,
                       time.perf_counter() - started)
