"""Storage for dcp_forge checkpoints: backends by URL scheme, DCP writer/reader, commit protocol.

``open_writer(url)`` / ``open_reader(url)`` give DCP ``StorageWriter`` / ``StorageReader`` objects
for a local path, ``file://``, ``memory://``, ``s3://`` or any fsspec URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .backends import FsspecBackend, LocalBackend, StorageBackend
from .lifecycle import (
    CheckpointState,
    checkpoint_state,
    delete_checkpoint,
    discard_partial_checkpoints,
    latest_checkpoint,
    list_checkpoints,
)
from .registry import BACKENDS, join_url, open_backend, redact_url

if TYPE_CHECKING:
    from .reader import ForgeStorageReader
    from .writer import ForgeStorageWriter


def __getattr__(name: str) -> Any:
    # The DCP reader and writer (and with them torch) are imported on first use, so that listing
    # and inspecting checkpoints (lifecycle.py, backends.py) starts without torch.
    if name == "ForgeStorageReader":
        from .reader import ForgeStorageReader

        return ForgeStorageReader
    if name == "ForgeStorageWriter":
        from .writer import ForgeStorageWriter

        return ForgeStorageWriter
    raise AttributeError(f"module 'dcp_forge.storage' has no attribute {name!r}")


def open_writer(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                thread_count: int = 2, extra: Mapping[str, Any] | None = None) -> ForgeStorageWriter:
    """A DCP StorageWriter for the checkpoint directory ``url``: ``thread_count`` files (and threads)
    per rank; ``extra``: JSON-able data stored in the manifest."""
    from .writer import ForgeStorageWriter

    return ForgeStorageWriter(url, storage_options, thread_count=thread_count, extra=extra)


def open_reader(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                thread_count: int = 2, verify_checksums: bool = True) -> ForgeStorageReader:
    """A DCP StorageReader for the checkpoint directory ``url``: ``thread_count`` reader threads per
    rank; ``verify_checksums`` checks every item read against its recorded xxh3."""
    from .reader import ForgeStorageReader

    return ForgeStorageReader(url, storage_options, thread_count=thread_count, verify_checksums=verify_checksums)


__all__ = [
    "BACKENDS", "CheckpointState", "ForgeStorageReader", "ForgeStorageWriter", "FsspecBackend",
    "LocalBackend", "StorageBackend", "checkpoint_state", "delete_checkpoint", "discard_partial_checkpoints",
    "join_url", "latest_checkpoint", "list_checkpoints", "open_backend", "open_reader", "open_writer",
    "redact_url",
]
