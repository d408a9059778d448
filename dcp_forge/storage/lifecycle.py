"""Checkpoint lifecycle on storage: claim, commit, list, delete.

A checkpoint directory goes through three states:

- *claimed*: ``_CLAIMED`` was created exclusively when its save began, so two savers can never
  write one checkpoint id;
- *committed*: ``_COMMITTED`` was created exclusively after every data file, ``.metadata``,
  ``index.parquet`` and the manifest were durable. Only committed checkpoints are listed or loaded;
- *deleted*: the marker goes first, then the rest, so a half-deleted checkpoint never looks
  complete.

A save that fails on every rank removes the directory it claimed (``discard_claimed``: only with its
own save id in ``_CLAIMED`` and no ``_COMMITTED``), so a failed save leaves no debris behind.

A directory with ``.metadata`` but none of our files (``FORGE_RECORDS``) is a plain DCP ("legacy")
checkpoint: DCP's own commit is writing ``.metadata`` last, so it counts as committed. A directory
holding any of our records but no commit marker is partial, never legacy: removing the marker (and
the claim and manifest) must not turn a checkpoint whose checksums are recorded into one that is
read unchecked.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    LocationNotFoundError,
    os_error_context,
)
from ..format.names import CLAIM_FILE, COMMIT_FILE, FORGE_RECORDS, METADATA_FILE
from .backends import LocalBackend, StorageBackend
from .registry import join_url, open_backend, redact_url


class CheckpointState(Enum):
    MISSING = "missing"
    PARTIAL = "partial"  # claimed or written, never committed: invisible
    COMMITTED = "committed"
    LEGACY = "legacy"  # plain DCP checkpoint (no manifest): loadable


@dataclass(frozen=True)
class CommitRecord:
    checkpoint_id: str
    save_id: str
    committed_at: float  # seconds since the epoch, on the committing rank
    manifest_checksum: str | None

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> CommitRecord:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError) as err:
            raise IntegrityError(f"commit marker {where} is malformed: {err}") from err


def checkpoint_state(backend: StorageBackend, path: str, names: Iterable[str] | None = None) -> CheckpointState:
    """What ``path`` holds, from a listing of it (``names``: one the caller has just made)."""
    names = set(backend.list_dir(path) if names is None else names)
    if COMMIT_FILE in names:
        return CheckpointState.COMMITTED
    if not names:
        return CheckpointState.MISSING
    if METADATA_FILE in names and not names.intersection(FORGE_RECORDS):
        return CheckpointState.LEGACY
    return CheckpointState.PARTIAL


def claim(backend: StorageBackend, path: str, save_id: str, url: str) -> None:
    """Take ``path`` for one save, or raise CheckpointExistsError saying who holds it."""
    # No permission, read-only, unreachable store: the error says which checkpoint.
    with os_error_context(f"claiming checkpoint {redact_url(url)} for a save", path):
        _claim(backend, path, save_id, url)


def _claim(backend: StorageBackend, path: str, save_id: str, url: str) -> None:
    backend.makedirs(path)
    state = checkpoint_state(backend, path)
    if state is CheckpointState.COMMITTED or state is CheckpointState.LEGACY:
        raise CheckpointExistsError(
            f"checkpoint {redact_url(url)} already exists and is committed; saves never overwrite "
            "one (choose another checkpoint_id, or delete it first)")
    names = backend.list_dir(path)
    if names and CLAIM_FILE not in names:
        raise CheckpointExistsError(
            f"checkpoint directory {redact_url(url)} is not empty (holds {names[:5]}); expected a "
            "new or empty directory")
    record = json.dumps({"save_id": save_id, "claimed_at": time.time(), "pid": os.getpid()}).encode()
    try:
        backend.create_exclusive(backend.join(path, CLAIM_FILE), record)
    except FileExistsError as err:
        raise CheckpointExistsError(
            f"checkpoint {redact_url(url)} is being written by another save, or a crashed save left it "
            "uncommitted; it is invisible to loads. Delete it (dcp_forge.delete_checkpoint or "
            "discard_partial_checkpoints) to reuse the id") from err


def claimant(backend: StorageBackend, path: str) -> str | None:
    """The save id recorded in ``path``'s claim marker; None without a (readable) one."""
    try:
        record = json.loads(backend.read_bytes(backend.join(path, CLAIM_FILE)))
    except FileNotFoundError:
        return None
    except ValueError:  # torn or foreign: nobody's claim we could prove to be ours
        return None
    return record.get("save_id") if isinstance(record, dict) else None


def discard_claimed(backend: StorageBackend, path: str, save_id: str) -> bool:
    """Remove the uncommitted checkpoint directory that save ``save_id`` claimed; True if removed.

    For a save that failed on every rank: nothing writes into the directory any more. Anything
    else is left alone: a directory claimed by another save (the id was taken), one without our
    claim (claiming failed, or it was never ours) and one with a commit marker (committed after all,
    even if the save could not tell). The claim goes last, so a removal cut short leaves a claimed,
    uncommitted directory, which ``discard_partial_checkpoints`` removes; never an unclaimed one
    that blocks the id.
    """
    if claimant(backend, path) != save_id or backend.exists(backend.join(path, COMMIT_FILE)):
        return False
    for name in backend.list_dir(path):
        if name != CLAIM_FILE:
            backend.remove(backend.join(path, name))
    backend.remove_tree(path)
    return True


def commit(backend: StorageBackend, path: str, record: CommitRecord) -> None:
    """Create the commit marker. If the store cannot say whether that worked (every reply lost:
    ConnectionError), one read settles it: the marker is ours iff it carries our save_id."""
    try:
        backend.create_exclusive(backend.join(path, COMMIT_FILE), record.to_bytes())
    except ConnectionError as unknown:
        try:
            ours = read_commit(backend, path).save_id == record.save_id
        except (OSError, IntegrityError):
            ours = False
        if not ours:
            raise unknown


def read_commit(backend: StorageBackend, path: str) -> CommitRecord:
    marker = backend.join(path, COMMIT_FILE)
    try:
        return CommitRecord.from_bytes(backend.read_bytes(marker), marker)
    except LocationNotFoundError:
        raise  # no bucket: not a checkpoint that merely lacks its marker
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(f"checkpoint {path} is not committed") from err


def _committed_entries(output_dir: str, storage_options: Mapping[str, Any] | None
                       ) -> list[tuple[float, str, str]]:
    backend, root = open_backend(output_dir, storage_options)
    entries = []
    for name in backend.list_dir(root, dirs_only=True):
        path = backend.join(root, name)
        state = checkpoint_state(backend, path)
        if state is CheckpointState.COMMITTED:
            entries.append((read_commit(backend, path).committed_at, name, join_url(output_dir, name)))
        elif state is CheckpointState.LEGACY:
            entries.append((_legacy_time(backend, path), name, join_url(output_dir, name)))
    entries.sort()
    return entries


def _legacy_time(backend: StorageBackend, path: str) -> float:
    try:
        info = backend.fs.info(backend.join(path, METADATA_FILE))
    except (FileNotFoundError, OSError):
        return 0.0
    modified = info.get("mtime") or info.get("LastModified") or info.get("created") or 0.0
    return modified.timestamp() if hasattr(modified, "timestamp") else float(modified)


def location_exists(output_dir: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether anything is at ``output_dir`` (a directory; on S3, an object under the prefix).

    LocationNotFoundError for an S3 bucket that does not exist, ConnectionError for a store that
    cannot be reached: neither is a location that is merely empty.
    """
    return _location_exists(*open_backend(output_dir, storage_options))


def _location_exists(backend: StorageBackend, root: str) -> bool:
    return bool(backend.list_dir(root)) or backend.exists(root)


def check_output_dir(output_dir: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise unless ``output_dir`` can be the directory of a run that has saved nothing yet.

    Where no checkpoint is found, a run starts from scratch; that must not happen because a
    location was mistyped. An S3 prefix is always a possible run directory, its bucket is not: no
    bucket is LocationNotFoundError (naming it), an unreachable store ConnectionError. On local disk
    the first save creates ``output_dir`` and any missing parents, but an ``output_dir`` that does
    not exist together with its parent is far more often a typo than a first run: that is
    LocationNotFoundError too (create the parent to start a new run there).
    """
    backend, root = open_backend(output_dir, storage_options)
    parent = os.path.dirname(root.rstrip(os.sep))
    if not _location_exists(backend, root) and isinstance(backend, LocalBackend) and not os.path.isdir(parent):
        raise LocationNotFoundError(
            errno.ENOENT, f"output_dir does not exist, and neither does its parent {parent}: a mistyped path? "
            f"(to start a new run there, create {parent} first)", redact_url(output_dir))


def list_checkpoints(output_dir: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
                     ) -> list[str]:
    """Committed checkpoints under ``output_dir``, oldest commit first. LocationNotFoundError for an
    S3 bucket that does not exist (a missing or empty directory or prefix has none)."""
    return [url for _, _, url in _committed_entries(os.fspath(output_dir), storage_options)]


def latest_checkpoint(output_dir: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
                      ) -> str | None:
    """The most recently committed checkpoint under ``output_dir``, or None."""
    entries = _committed_entries(os.fspath(output_dir), storage_options)
    return entries[-1][2] if entries else None


def delete_checkpoint(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove a checkpoint: its commit marker first, so a half-deleted one never looks complete."""
    backend, native = open_backend(path, storage_options)
    if not backend.exists(native):
        raise CheckpointNotFoundError(f"no checkpoint at {redact_url(path)}")
    backend.remove(backend.join(native, COMMIT_FILE))
    backend.sync_dir(native)
    backend.remove_tree(native)


def discard_partial_checkpoints(output_dir: str | os.PathLike,
                                storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete every uncommitted checkpoint directory under ``output_dir`` (after a crash, on resume).

    Only safe when no other job is saving into ``output_dir`` right now.
    """
    backend, root = open_backend(output_dir, storage_options)
    removed = []
    for name in backend.list_dir(root, dirs_only=True):
        path = backend.join(root, name)
        if checkpoint_state(backend, path) is CheckpointState.PARTIAL:
            backend.remove_tree(path)
            removed.append(join_url(os.fspath(output_dir), name))
    return removed
