"""Where a tiered checkpoint's files are, and where they go: pure functions of listings and topology.

The local tier of a multi-node job is spread over the nodes: each node's directory holds one *node
copy* of each checkpoint: the data files its ranks wrote, the peer copies it keeps for other nodes,
the records every copy shares (index, ``.metadata``, manifest, ``_COMMITTED``) and its own ``_TIER``.
A checkpoint is **committed in the local tier** when some node copy holds its ``_COMMITTED`` (the
commit protocol creates the first one only after every node copy was complete and durable: see
local_commit.py); it is **loadable from the local tier** when the node copies of that save (same save
id) together hold every data file, whole. Everything here decides from listings, so a 1,000-node
job is testable in one process.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..core.topology import Topology
from ..format.names import INDEX_FILE, MANIFEST_FILE, METADATA_FILE
from ..format.tier_record import LOCAL, TierRecord
from ..storage import CommitRecord

SHARED_RECORDS = frozenset({INDEX_FILE, METADATA_FILE, MANIFEST_FILE})


@dataclass(frozen=True)
class NodeCopy:
    """One node's copy of one checkpoint directory, as listed on that node."""

    checkpoint_id: str
    node: int  # the listing node, in the current job's numbering
    claim_save_id: str | None = None
    commit: CommitRecord | None = None
    tier: TierRecord | None = None
    files: Mapping[str, int] = field(default_factory=dict)  # data files present (plain files) -> bytes
    records: frozenset[str] = frozenset()  # which of index, .metadata and manifest are present

    @property
    def save_id(self) -> str | None:
        if self.commit is not None:
            return self.commit.save_id
        if self.tier is not None:
            return self.tier.save_id
        return self.claim_save_id

    def belongs_to(self, commit: CommitRecord) -> bool:
        """Whether this copy is part of the save ``commit`` committed (a copy of another save of the
        same id, stale or foreign, is not)."""
        return (self.tier is not None and self.tier.tier == LOCAL and self.tier.save_id == commit.save_id
                and self.tier.checkpoint_id == commit.checkpoint_id)


@dataclass(frozen=True)
class LocalCheckpoint:
    """A checkpoint committed in the local tier, over the node copies that hold its save."""

    checkpoint_id: str
    commit: CommitRecord
    data_files: Mapping[str, int]  # every data file of the checkpoint -> bytes
    members: tuple[int, ...]  # nodes whose copy belongs to this save
    record_nodes: tuple[int, ...]  # members holding the commit marker and every shared record
    holders: Mapping[str, tuple[int, ...]]  # data file -> member nodes holding it whole
    drain: bool  # the save was due to be drained to the remote tier

    @property
    def committed_at(self) -> float:
        return self.commit.committed_at

    @property
    def missing(self) -> tuple[str, ...]:
        """Data files no member node holds whole."""
        return tuple(name for name in self.data_files if not self.holders.get(name))

    @property
    def loadable(self) -> bool:
        return bool(self.record_nodes) and bool(self.members) and not self.missing

    def why_not_loadable(self) -> str:
        if not self.members:
            return "no node copy carries its tier record"
        if not self.record_nodes:
            return "no node copy holds its commit marker and records"
        missing = self.missing
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        return f"data file(s) {shown} are on no node (nodes with a copy of it: {list(self.members)})"


def local_checkpoints(copies: Iterable[NodeCopy]) -> list[LocalCheckpoint]:
    """The checkpoints committed in the local tier, oldest commit first."""
    by_id: dict[str, list[NodeCopy]] = defaultdict(list)
    for copy in copies:
        by_id[copy.checkpoint_id].append(copy)
    found = []
    for checkpoint_id, its in by_id.items():
        commits = [c.commit for c in its if c.commit is not None and c.commit.checkpoint_id == checkpoint_id]
        if not commits:
            continue
        # Copies of one id committed by different saves (a stale node copy of an earlier run): the
        # newest commit is the checkpoint; copies of the others are not part of it.
        commit = max(commits, key=lambda c: (c.committed_at, c.save_id))
        members = sorted((c for c in its if c.belongs_to(commit)), key=lambda c: c.node)
        tier = next((c.tier for c in members if c.commit == commit), None) or (members[0].tier if members else None)
        data_files = dict(tier.data_files) if tier is not None else {}
        holders = {name: tuple(c.node for c in members if c.files.get(name) == size)
                   for name, size in data_files.items()}
        record_nodes = tuple(c.node for c in members if c.commit == commit and c.records >= SHARED_RECORDS)
        found.append(LocalCheckpoint(checkpoint_id, commit, data_files, tuple(c.node for c in members),
                                     record_nodes, holders, bool(tier is not None and tier.drain)))
    return sorted(found, key=lambda c: (c.committed_at, c.checkpoint_id))


def uncommitted_copies(copies: Iterable[NodeCopy], committed: Sequence[LocalCheckpoint]) -> list[NodeCopy]:
    """Node copies left by saves that never committed in the local tier (nor belong to one that did):
    what a crashed or failed save left behind. Committed copies of other saves are never among them."""
    commits = {c.checkpoint_id: c.commit for c in committed}
    out = []
    for copy in copies:
        commit = commits.get(copy.checkpoint_id)
        if copy.commit is not None or (commit is not None and copy.belongs_to(commit)):
            continue
        out.append(copy)
    return out


def retention_victims(committed: Sequence[LocalCheckpoint], keep: int, busy: Iterable[str] = ()) -> list[str]:
    """Checkpoint ids the local tier no longer keeps: all but the newest ``keep`` committed ones, except
    ``busy`` ones (being drained). Oldest first."""
    ordered = sorted(committed, key=lambda c: (c.committed_at, c.checkpoint_id))
    kept = {c.checkpoint_id for c in ordered[-keep:]} | set(busy)
    return [c.checkpoint_id for c in ordered if c.checkpoint_id not in kept]


# --- where files come from ---------------------------------------------------------------------
def node_readers(holders: Mapping[str, Sequence[int]], topology: Topology) -> dict[str, frozenset[int]]:
    """Data file -> the ranks that can read it (the ranks of the nodes holding it)."""
    return {name: frozenset(r for node in nodes for r in topology.ranks_on_node(node))
            for name, nodes in holders.items()}


def peer_targets(topology: Topology, rank: int, copies: int) -> tuple[int, ...]:
    """The ranks that keep peer copies of ``rank``'s files: one on each of the next ``copies`` nodes
    (in node order, wrapping around), at the same local position where that node has one."""
    if copies >= topology.num_nodes and copies > 0:
        raise ValueError(f"peer_copies={copies} needs at least {copies + 1} nodes, each keeping copies for others "
                         f"(the job has {topology.num_nodes})")
    node = topology.node_of_rank[rank]
    position = topology.ranks_on_node(node).index(rank)
    out = []
    for step in range(1, copies + 1):
        ranks = topology.ranks_on_node((node + step) % topology.num_nodes)
        out.append(ranks[position % len(ranks)])
    return tuple(out)


@dataclass(frozen=True, order=True)
class Transfer:
    """One data file going from rank ``src``'s node copy to rank ``dst``'s."""

    src: int
    file: str
    size: int
    dst: int


def peer_transfers(topology: Topology, copies: int, files: Mapping[str, tuple[int, int]]) -> list[Transfer]:
    """Every peer copy a save makes: ``files`` maps each data file to (writer rank, bytes)."""
    return sorted(Transfer(writer, name, size, dst) for name, (writer, size) in files.items()
                  for dst in peer_targets(topology, writer, copies))


def plan_uploads(files: Mapping[str, tuple[int, int]], readers: Mapping[str, Iterable[int]], world_size: int
                 ) -> dict[str, int]:
    """Which rank sends each data file to the remote tier: its writer where that rank can read it (it
    was written there), else the least loaded rank that can. ``files``: file -> (writer, bytes)."""
    from ..core.placement import place_on_least_loaded  # imports torch: listings stay torch-free

    load = [0] * world_size
    chosen: dict[str, int] = {}
    rest = []
    for name, (writer, size) in sorted(files.items()):
        able = sorted(set(readers.get(name, ())))
        if not able:
            raise ValueError(f"no rank can read data file {name}")
        if writer in able:
            chosen[name] = writer
            load[writer] += size
        else:
            rest.append((size, name, name, able))
    chosen.update(place_on_least_loaded(rest, load))
    return chosen
