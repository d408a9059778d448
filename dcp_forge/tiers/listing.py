"""Listing one node's local tier: what each node copy holds, read from the node's own directory."""

from __future__ import annotations

import os
import stat

from ..errors import IntegrityError
from ..format.names import CLAIM_FILE, COMMIT_FILE, DATA_SUFFIX, TIER_FILE, validate_checkpoint_id
from ..format.tier_record import TierRecord
from ..storage import CommitRecord, StorageBackend, claimant, open_backend
from .layout import SHARED_RECORDS, NodeCopy


def _plain_file_sizes(path: str, names: list[str]) -> dict[str, int]:
    """Sizes of the data files among ``names`` that are plain files (a link is never a copy's file)."""
    sizes = {}
    for name in names:
        if not name.endswith(DATA_SUFFIX):
            continue
        try:
            info = os.stat(os.path.join(path, name), follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            sizes[name] = info.st_size
    return sizes


def _is_checkpoint_id(name: str) -> bool:
    try:
        validate_checkpoint_id(name)
    except ValueError:
        return False
    return True


def read_node_copy(backend: StorageBackend, path: str, checkpoint_id: str, node: int) -> NodeCopy:
    """What the node copy at ``path`` holds (a malformed marker or tier record counts as absent)."""
    names = backend.list_dir(path)
    commit = tier = None
    if COMMIT_FILE in names:
        try:
            commit = CommitRecord.from_bytes(backend.read_bytes(backend.join(path, COMMIT_FILE)), path)
        except (IntegrityError, FileNotFoundError):
            commit = None
    if TIER_FILE in names:
        try:
            tier = TierRecord.from_bytes(backend.read_bytes(backend.join(path, TIER_FILE)), path)
        except (IntegrityError, FileNotFoundError):
            tier = None
    return NodeCopy(checkpoint_id=checkpoint_id, node=node,
                    claim_save_id=claimant(backend, path) if CLAIM_FILE in names else None,
                    commit=commit, tier=tier, files=_plain_file_sizes(path, names),
                    records=frozenset(SHARED_RECORDS.intersection(names)))


def list_node_copies(root: str, node: int) -> list[NodeCopy]:
    """Every checkpoint directory under this node's local tier ``root`` (none if it does not exist)."""
    backend, native = open_backend(root)
    return [read_node_copy(backend, backend.join(native, name), name, node)
            for name in backend.list_dir(native, dirs_only=True) if _is_checkpoint_id(name)]
