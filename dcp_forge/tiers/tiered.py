"""``TieredStorage``: what a ``CheckpointCoordinator`` with a ``LocalTier`` does besides DCP's save and load.

Call protocol: built by the coordinator on every rank together (collective: it checks that the ranks
agree on the tier's settings and that each node's directory is its own, and creates two gloo groups:
one for committing saves, one for drains). Every other method is collective over the group it is
given (or, for ``finish_save``, over its own commit group), called by every rank at the same point.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .. import collectives
from ..errors import ComponentDeclarationError, os_error_context
from ..format.names import new_save_id
from ..format.tier_record import LOCAL
from ..rank_exchange import RankExchange
from ..storage import (
    CheckpointState,
    RecordFiles,
    checkpoint_state,
    claimant,
    delete_checkpoint,
    discard_claimed,
    join_url,
    open_backend,
    parse_index,
    raise_if_problems,
    redact_url,
    scheme_of,
)
from .drain import Drainer, DrainJob, drain, uploads_at_save
from .layout import (
    LocalCheckpoint,
    NodeCopy,
    local_checkpoints,
    node_readers,
    peer_targets,
    plan_uploads,
    retention_victims,
    uncommitted_copies,
)
from .listing import list_node_copies
from .local_commit import LocalCommit, NodeLocalWriter, claim_node_copies, commit_local, files_of
from .policy import LocalTier
from .recovery import Source, load_sources, remote_checkpoints
from .site import TierSite

logger = logging.getLogger(__name__)

_PROBE_PREFIX = ".forge-node-probe-"


class TieredStorage:
    """The local tier of one coordinator (``tier``), draining to ``output_dir``."""

    def __init__(self, tier: LocalTier, topology: Any, group: Any, output_dir: str,
                 storage_options: Mapping[str, Any], thread_count: int) -> None:
        self.site = TierSite(tier, topology)
        self.output_dir = output_dir
        self.storage_options = dict(storage_options)
        self.thread_count = thread_count
        # Gathered before anything can raise, so every rank raises the same error.
        gathered = collectives.all_gather(group, (tier.settings(), _overlap_problem(tier.root, output_dir)))
        problems = [p for _, p in gathered if p is not None]
        if problems:
            raise ComponentDeclarationError(problems[0])
        settings = [s for s, _ in gathered]
        if any(s != settings[0] for s in settings):
            raise ComponentDeclarationError(
                f"ranks disagree on the LocalTier's keep, peer_copies and drain_every (rank by rank: {settings}); "
                "only its path may differ between nodes")
        if tier.peer_copies:
            peer_targets(topology, topology.rank, tier.peer_copies)  # raises unless the job has enough nodes
        _check_node_local(self.site, group)
        self.commit_group = collectives.checkpoint_group() if group is not None else None
        self.drainer = Drainer(collectives.checkpoint_group() if group is not None else None, topology.rank)
        self._saves = 0
        self.last_commit: LocalCommit | None = None
        self.last_loaded: Source | None = None  # the copy the last load read (set by the coordinator)

    @property
    def tier(self) -> LocalTier:
        return self.site.tier

    # --- saving -----------------------------------------------------------------------------------
    def begin_save(self, group: Any, checkpoint_id: str, drain: bool | None) -> tuple[str, bool]:
        """Before a save: raise a drain failure nobody saw, agree on a save id, claim every node copy.
        Returns the save id and whether the save is to be drained."""
        self.drainer.raise_failures(group)
        self._saves += 1
        due = drain if drain is not None else self._saves % self.tier.drain_every == 0
        save_id = collectives.run_on(group, 0, new_save_id)
        claim_node_copies(self.site, group, checkpoint_id, save_id)
        return save_id, due

    def writer(self, checkpoint_id: str, save_id: str, *, extra: Mapping[str, Any] | None,
               training_args_hash: str | None, commit_gate: Callable[[], None] | None,
               exchange: RankExchange | None = None) -> NodeLocalWriter:
        """The DCP storage writer of this rank's node copy of ``checkpoint_id``."""
        return NodeLocalWriter(self.site.copy_path(checkpoint_id), save_id, self.site, thread_count=self.thread_count,
                               extra=extra, training_args_hash=training_args_hash, commit_gate=commit_gate,
                               exchange=exchange)

    def finish_save(self, writer: NodeLocalWriter, checkpoint_id: str, drain: bool) -> LocalCommit:
        """After DCP's save (on the caller's thread: the foreground or the async save's background thread):
        commit in the local tier, apply local retention, start the drain. Collective over the commit group."""
        done = commit_local(self.site, self.commit_group, writer, checkpoint_id, drain=drain)
        self.last_commit = done
        if self.site.rank == 0:
            logger.info("committed %s in the local tier (%.3fs; peer copies: %d bytes sent)", checkpoint_id,
                        done.seconds, done.peer_copy.bytes_sent)
        self.apply_retention(self.commit_group)
        if drain:
            job = DrainJob(checkpoint_id, done.commit, done.records, done.rows, uploads_at_save(done.files))
            self._submit(job)
        return done

    def _submit(self, job: DrainJob) -> None:
        self.drainer.submit(job.checkpoint_id, lambda: drain(job, self.site, self.drainer.group, self.output_dir,
                                                             self.storage_options, self.thread_count))

    # --- the local tier, job-wide ----------------------------------------------------------------
    def node_copies(self, group: Any) -> list[NodeCopy]:
        """Every node copy in the local tier, listed by each node's leader. Collective."""
        gathered = collectives.gather_results(
            group, lambda: list_node_copies(self.site.root, self.site.node) if self.site.leader else [])
        return [copy for copies in gathered for copy in copies]

    def committed(self, group: Any) -> list[LocalCheckpoint]:
        """The checkpoints committed in the local tier, oldest first. Collective."""
        return local_checkpoints(self.node_copies(group))

    def _remove_on_nodes(self, group: Any, doomed: list[tuple[int, str]], committed: bool) -> None:
        """Every node's leader removes its listed node copies (``committed``: marker first)."""
        def remove() -> None:
            if not self.site.leader:
                return
            for node, checkpoint_id in doomed:
                if node != self.site.node:
                    continue
                path = self.site.copy_path(checkpoint_id)
                with os_error_context(f"rank {self.site.rank} removing {path} from the local tier", path):
                    if committed:
                        delete_checkpoint(path)
                    else:
                        self.site.backend().remove_tree(path)

        collectives.on_every_rank(group, remove)

    def apply_retention(self, group: Any) -> list[str]:
        """Delete the local tier's copies of every checkpoint but the newest ``keep`` (and the one being
        drained). Returns the ids deleted. Collective."""
        copies = self.node_copies(group)
        victims = collectives.run_on(group, 0, lambda: retention_victims(local_checkpoints(copies), self.tier.keep,
                                                                          self.drainer.busy()))
        if victims:
            doomed = [(c.node, c.checkpoint_id) for c in copies if c.checkpoint_id in victims]
            self._remove_on_nodes(group, doomed, committed=True)
            if self.site.rank == 0:
                logger.info("local tier retention (keep %d): deleted %s", self.tier.keep, ", ".join(victims))
        return victims

    def discard_uncommitted(self, group: Any) -> list[str]:
        """Remove the node copies of saves that never committed in the local tier (after a crash). Only
        safe while this job is not saving. Returns one line for each. Collective."""
        copies = self.node_copies(group)
        leftovers = uncommitted_copies(copies, local_checkpoints(copies))
        self._remove_on_nodes(group, [(c.node, c.checkpoint_id) for c in leftovers], committed=False)
        return [f"{c.checkpoint_id} in node {c.node}'s local tier" for c in leftovers]

    # --- loading ----------------------------------------------------------------------------------
    def sources(self, group: Any, checkpoint_id: str | None = None, *, announce: bool = True) -> list[Source]:
        """The copies a load tries, in order (see recovery.py); logs (``announce``), on rank 0, why the
        newest local checkpoint cannot be loaded from the local tier when it cannot. Collective."""
        copies = self.node_copies(group)

        def decide() -> tuple[list[Source], list[str]]:
            return load_sources(local_checkpoints(copies), remote_checkpoints(self.output_dir, self.storage_options),
                                checkpoint_id)

        sources, notes = collectives.run_on(group, 0, decide)
        if self.site.rank == 0 and announce:
            for note in notes:
                logger.warning("%s (peer_copies=%d: the local tier survives losing the local storage of %d "
                               "node%s)", note, self.tier.peer_copies, self.tier.peer_copies,
                               "" if self.tier.peer_copies == 1 else "s")
        return sources

    def discard_newer_than_loaded(self, group: Any) -> list[str]:
        """After a resume from ``last_loaded``: delete the local tier's checkpoints committed after it (they
        could not be loaded, and would keep the resumed run from saving their ids again). Collective."""
        if self.last_loaded is None:
            return []
        loaded = self.last_loaded.commit
        copies = self.node_copies(group)
        newer = [c.checkpoint_id for c in local_checkpoints(copies)
                 if (c.committed_at, c.checkpoint_id) > (loaded.committed_at, loaded.checkpoint_id)]
        if newer:
            self._remove_on_nodes(group, [(c.node, c.checkpoint_id) for c in copies if c.checkpoint_id in newer],
                                  committed=True)
            if self.site.rank == 0:
                logger.warning("resumed from %s: deleted the local tier's newer checkpoints %s, which could not be "
                               "loaded", loaded.checkpoint_id, ", ".join(newer))
        return newer

    def local_copy_path(self, checkpoint_id: str) -> str:
        return self.site.copy_path(checkpoint_id)

    def readers(self, source: Source) -> dict[str, frozenset[int]] | None:
        """For a local source on several nodes: which ranks can read each data file (None: every rank
        reads its own node's copy, which holds every file)."""
        if source.tier != LOCAL or source.holders is None or self.site.topology.num_nodes == 1:
            return None
        return node_readers(source.holders, self.site.topology)

    def records_rank(self, source: Source) -> int:
        """The rank that reads a source's records (a rank on a node whose copy holds them)."""
        return self.site.leader_of(source.record_nodes[0]) if source.tier == LOCAL else 0

    # --- draining what a restart left undrained --------------------------------------------------
    def drain_pending(self, group: Any) -> list[str]:
        """Start draining every checkpoint committed in the local tier that was due to be drained and has no
        committed remote copy (its drain was interrupted), oldest first. Returns their ids. Collective."""
        committed = [c for c in self.committed(group) if c.drain and c.loadable]
        if not committed:
            return []
        remote = collectives.run_on(group, 0, lambda: remote_checkpoints(self.output_dir, self.storage_options))
        drained = {(r.checkpoint_id, r.commit.save_id) for r in remote}
        taken = {r.checkpoint_id for r in remote}
        started = []
        for c in committed:
            if (c.checkpoint_id, c.commit.save_id) in drained:
                continue
            if c.checkpoint_id in taken:
                if self.site.rank == 0:
                    logger.warning("not draining %s: the remote tier holds another checkpoint of that id",
                                   c.checkpoint_id)
                continue
            records = collectives.run_on(group, self.site.leader_of(c.record_nodes[0]),
                                         functools.partial(self._node_records, c))
            rows, problems = parse_index(records.index, self.site.copy_path(c.checkpoint_id))
            raise_if_problems(problems)
            files = files_of(rows)
            uploads = plan_uploads(files, node_readers(c.holders, self.site.topology), self.site.topology.world_size)
            collectives.run_on(group, 0, functools.partial(self._discard_interrupted_drain, c))
            self._submit(DrainJob(c.checkpoint_id, c.commit, records, tuple(rows), uploads))
            started.append(c.checkpoint_id)
        return started

    def _node_records(self, checkpoint: LocalCheckpoint) -> RecordFiles:
        """The shared records of this node's copy of ``checkpoint`` (on a node that holds them)."""
        return RecordFiles.read(*open_backend(self.site.copy_path(checkpoint.checkpoint_id)))

    def _discard_interrupted_drain(self, checkpoint: LocalCheckpoint) -> None:
        """Remove an uncommitted remote copy of this very save (a drain cut short): nothing else writes it."""
        url = join_url(self.output_dir, checkpoint.checkpoint_id)
        backend, path = open_backend(url, self.storage_options)
        if checkpoint_state(backend, path) is CheckpointState.PARTIAL \
                and claimant(backend, path) == checkpoint.commit.save_id:
            discard_claimed(backend, path, checkpoint.commit.save_id)
            logger.info("removed the interrupted drain %s", redact_url(url))

    # --- lifecycle --------------------------------------------------------------------------------
    def wait(self) -> None:
        self.drainer.wait()

    def close(self, raise_failure: bool = True) -> None:
        try:
            self.drainer.close(raise_failure=raise_failure)
        finally:
            collectives.release_group(self.drainer.group)
            collectives.release_group(self.commit_group)


def _overlap_problem(root: str, output_dir: str) -> str | None:
    """The local tier and output_dir must not contain each other: their listings would mix."""
    if scheme_of(output_dir) not in ("", "file"):
        return None
    a, b = os.path.realpath(root), os.path.realpath(open_backend(output_dir)[1])
    if a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep):
        return f"LocalTier.path {root} and output_dir {output_dir} must be separate directories (neither inside the other)"
    return None


def _check_node_local(site: TierSite, group: Any) -> None:
    """Each node's leader leaves a probe file in its directory; every rank must see its own node's probe
    and no other node's: ranks of one node share one directory, and no two nodes share one."""
    root = site.root
    probe = f"{_PROBE_PREFIX}{uuid.uuid4().hex}" if site.leader else None

    def leave_probe() -> None:
        if probe is not None:
            with os_error_context(f"rank {site.rank} setting up the local tier", root):
                os.makedirs(root, exist_ok=True)
                with open(os.path.join(root, probe), "x"):
                    pass

    try:
        collectives.on_every_rank(group, leave_probe)
        probes = collectives.all_gather(group, (site.node, probe))

        def look() -> None:
            seen = set(os.listdir(root)) if os.path.isdir(root) else set()
            mine = next(p for n, p in probes if n == site.node and p is not None)
            shared = sorted({n for n, p in probes if p is not None and n != site.node and p in seen})
            if shared:
                raise ComponentDeclarationError(
                    f"LocalTier.path {root} of node {site.node} is also node {shared}'s: the local tier must be "
                    "node-local storage (a local disk or /dev/shm), each node its own directory")
            if mine not in seen:
                raise ComponentDeclarationError(
                    f"rank {site.rank} on node {site.node} names another local tier directory ({root}) than its "
                    "node's first rank: the ranks of one node must share one")

        collectives.on_every_rank(group, look)
    finally:
        if probe is not None:
            try:
                os.unlink(os.path.join(root, probe))
            except OSError:
                pass
