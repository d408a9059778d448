"""Storage for dcp_forge checkpoints: backends by URL scheme, DCP writer/reader, commit protocol.

``open_writer(url)`` / ``open_reader(url)`` give DCP ``StorageWriter`` / ``StorageReader`` objects
for a local path, ``file://``, ``memory://``, ``s3://`` or any fsspec URL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .backends import FsspecBackend, InputFile, LocalBackend, OutputStream, StorageBackend, discard_after
from .consistency import (
    Problem,
    ProblemKind,
    RecordFiles,
    component_of,
    parse_index,
    raise_if_problems,
    record_problems,
    storage_location_problems,
)
from .files import check_extent, extent_problem, open_data_file
from .lifecycle import (
    CheckpointState,
    CommitRecord,
    check_output_dir,
    checkpoint_state,
    claim,
    claimant,
    commit,
    delete_checkpoint,
    discard_claimed,
    discard_partial_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    location_exists,
    read_commit,
)
from .registry import BACKENDS, join_url, open_backend, redact_url, scheme_of
from .verified_copy import COPY_CHUNK_BYTES, ItemVerifier, copy_verified, file_sizes, rows_by_file

if TYPE_CHECKING:
    from .cross_check import ItemCheck, StoredChunk, coverage_problems, manifest_problems
    from .item_reader import byte_view, packed_tensor, packed_value_zip, read_blob, stored_tensor
    from .read_once import ReadOnceStorageReader, read_once_by_default
    from .reader import ForgeStorageReader
    from .safetensors_reader import ReadStats, SafetensorsReader
    from .writer import ForgeStorageWriter

# Names whose modules import torch: loaded on first use, so that listing and inspecting checkpoints
# (the names above) starts without torch.
_NEEDS_TORCH = {
    "ForgeStorageReader": "reader", "ForgeStorageWriter": "writer",
    "ItemCheck": "cross_check", "StoredChunk": "cross_check", "coverage_problems": "cross_check",
    "manifest_problems": "cross_check", "read_blob": "item_reader", "stored_tensor": "item_reader",
    "packed_tensor": "item_reader", "packed_value_zip": "item_reader",
    "ReadOnceStorageReader": "read_once", "read_once_by_default": "read_once", "byte_view": "item_reader",
    "ReadStats": "safetensors_reader", "SafetensorsReader": "safetensors_reader",
}


def __getattr__(name: str) -> Any:
    module = _NEEDS_TORCH.get(name)
    if module is None:
        raise AttributeError(f"module 'dcp_forge.storage' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


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
    "BACKENDS", "COPY_CHUNK_BYTES", "CheckpointState", "CommitRecord", "ItemVerifier", "OutputStream", "claim",
    "claimant", "commit", "copy_verified", "discard_after", "discard_claimed", "file_sizes", "rows_by_file",
    "scheme_of", "ForgeStorageReader", "ForgeStorageWriter", "FsspecBackend", "InputFile",
    "ItemCheck", "LocalBackend", "Problem", "ProblemKind", "ReadOnceStorageReader", "ReadStats", "RecordFiles",
    "SafetensorsReader", "StorageBackend", "StoredChunk", "byte_view", "check_extent", "check_output_dir", "checkpoint_state", "component_of", "coverage_problems", "delete_checkpoint",
    "discard_partial_checkpoints", "extent_problem", "join_url", "latest_checkpoint", "list_checkpoints", "location_exists",
    "manifest_problems", "open_backend", "open_data_file", "open_reader", "open_writer", "parse_index",
    "raise_if_problems", "read_blob", "read_commit", "read_once_by_default", "record_problems", "redact_url", "storage_location_problems",
    "stored_tensor", "packed_tensor", "packed_value_zip",
]
