"""Which copy a load reads: the newest checkpoint committed and loadable in any tier, local first.

Pure, given the local tier's listing (``layout.local_checkpoints``) and the remote tier's committed
checkpoints. Saves are ordered by their commit time (the same in every copy: the drained copy carries
the local save's commit record). For each save, newest first: its local copy if the node copies hold
every data file, then its remote copy. A load tries them in that order and moves on only when a copy
turns out damaged (a checksum, a missing file): the first one that loads is loaded whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.tier_record import LOCAL, REMOTE
from ..storage import CommitRecord, join_url, open_backend, read_commit
from .layout import LocalCheckpoint


@dataclass(frozen=True)
class RemoteCheckpoint:
    checkpoint_id: str
    url: str
    commit: CommitRecord


def remote_checkpoints(output_dir: str, storage_options: Mapping[str, object]) -> list[RemoteCheckpoint]:
    """The checkpoints committed under ``output_dir`` (one listing, then each commit marker), oldest first.
    Uncommitted directories (a drain in flight or interrupted) are not among them."""
    backend, root = open_backend(output_dir, storage_options)
    found = []
    for name in backend.list_dir(root, dirs_only=True):
        try:
            record = read_commit(backend, backend.join(root, name))
        except (CheckpointNotFoundError, IntegrityError):
            continue  # not committed, or a marker nobody can vouch for: invisible, as for list_checkpoints
        found.append(RemoteCheckpoint(name, join_url(output_dir, name), record))
    return sorted(found, key=lambda c: (c.commit.committed_at, c.checkpoint_id))


@dataclass(frozen=True)
class Source:
    """One copy of one save to load from. Local: ``holders`` (data file -> nodes holding it) and
    ``record_nodes`` (nodes whose copy has the records); remote: ``url``."""

    checkpoint_id: str
    tier: str
    commit: CommitRecord
    url: str | None = None
    holders: Mapping[str, tuple[int, ...]] | None = None
    record_nodes: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"{self.checkpoint_id} ({'the local tier' if self.tier == LOCAL else 'the remote tier'})"


def load_sources(local: Sequence[LocalCheckpoint], remote: Sequence[RemoteCheckpoint],
                 checkpoint_id: str | None = None) -> tuple[list[Source], list[str]]:
    """The copies to try, in order, and one line per newer local checkpoint that cannot be loaded from
    the local tier (why, and where the load goes instead). ``checkpoint_id``: only that checkpoint."""
    saves: dict[tuple[str, str], dict[str, LocalCheckpoint | RemoteCheckpoint]] = {}
    for c in local:
        saves.setdefault((c.checkpoint_id, c.commit.save_id), {})[LOCAL] = c
    for r in remote:
        saves.setdefault((r.checkpoint_id, r.commit.save_id), {})[REMOTE] = r
    order = sorted(saves.items(), key=lambda kv: (-_commit_of(kv[1]).committed_at, kv[0]))
    sources: list[Source] = []
    notes: list[str] = []
    for (name, _), copies in order:
        if checkpoint_id is not None and name != checkpoint_id:
            continue
        here = copies.get(LOCAL)
        there = copies.get(REMOTE)
        if isinstance(here, LocalCheckpoint):
            if here.loadable:
                sources.append(Source(name, LOCAL, here.commit, holders=dict(here.holders),
                                      record_nodes=here.record_nodes))
            elif not sources:
                instead = (f"loading its remote copy {there.url}" if isinstance(there, RemoteCheckpoint)
                           else "it has no remote copy; loading the newest older checkpoint instead")
                notes.append(f"{name} is committed in the local tier but cannot be loaded from it: "
                             f"{here.why_not_loadable()}; {instead}")
        if isinstance(there, RemoteCheckpoint):
            sources.append(Source(name, REMOTE, there.commit, url=there.url))
    return sources, notes


def _commit_of(copies: Mapping[str, LocalCheckpoint | RemoteCheckpoint]) -> CommitRecord:
    """The commit record of a save: its local copy's, else its remote copy's (it has one or both)."""
    return (copies.get(LOCAL) or copies[REMOTE]).commit
