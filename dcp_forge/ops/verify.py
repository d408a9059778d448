"""``verify_checkpoint``: recompute every checksum of a checkpoint and check that it is complete.

What is checked, in order (docs/FORMAT.md describes the files):

1. the checkpoint is committed (``_COMMITTED`` exists), or is a plain DCP checkpoint;
2. the chain of records: the commit marker vouches for the manifest, the manifest for ``.metadata``
   and ``index.parquet`` (a stale or swapped manifest, metadata or index is caught here);
3. ``.metadata`` unpickles with the restricted loader and points only at files in the directory;
4. completeness: every item DCP's metadata lists has a stored location, every stored location is in
   the index with the same extent, tensor chunks cover their tensors, and the manifest's
   per-component sizes and checksums match the index;
5. the data files: each exists, none is shorter (truncated) or longer than its items, every
   item's bytes hash to the xxh3 the index recorded, and where the index records where a tensor
   starts inside its blob (``data_offset``), the blob's own zip records say the same (plain DCP
   checkpoints record neither: only presence and extents are checked).

Every problem found is reported (not just the first), each naming the file and, where one is
involved, the component. Nothing is modified.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import xxhash
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from ..core.keys import top_level_key
from ..errors import IntegrityError
from ..format.index import ItemRecord
from ..format.manifest import CheckpointManifest, combine_checksums
from ..format.names import INDEX_FILE, MANIFEST_FILE, METADATA_FILE
from ..format.safe_load import UnsafeCheckpointError, load_dcp_metadata
from ..format.torch_blob import BlobEdges, TensorBlobLayout, describe_layout, recorded_layout
from ..storage.backends import StorageBackend
from ..storage.consistency import (
    Problem,
    ProblemKind,
    RecordFiles,
    parse_index,
    record_problems,
    storage_location_problems,
)
from ..storage.lifecycle import CheckpointState, checkpoint_state
from ..storage.registry import open_backend, redact_url

__all__ = ["Problem", "ProblemKind", "verify_checkpoint"]

# Data is hashed in pieces of this size, so verifying a 100 GB checkpoint needs little memory.
_READ_PIECE = 8 * 1024 * 1024


@dataclass(frozen=True)
class _Extent:
    """One stored item: where it is and (when recorded) the checksum of its bytes and where its
    tensor starts inside it."""

    file: str
    offset: int
    length: int
    checksum: str | None
    component: str
    fqn: str
    data_offset: int | None = None
    layout: TensorBlobLayout | None = None  # the tensor the index describes at data_offset


def verify_checkpoint(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                      thread_count: int = 2, progress: Callable[[int], None] | None = None) -> list[Problem]:
    """Every problem with the checkpoint at ``url`` (an empty list: it is intact and complete).

    ``progress(nbytes)`` is called as data bytes are hashed (for a progress bar). Reads run on
    ``thread_count`` threads, one data file each.
    """
    if not isinstance(thread_count, int) or isinstance(thread_count, bool) or thread_count < 1:
        raise ValueError(f"'thread_count' must be a positive int (got {thread_count!r})")
    url = os.fspath(url)
    where = redact_url(url)
    backend, path = open_backend(url, storage_options)
    state = checkpoint_state(backend, path)
    if state is CheckpointState.MISSING:
        return [Problem(ProblemKind.MISSING_CHECKPOINT, f"no checkpoint at {where}")]
    if state is CheckpointState.PARTIAL:
        return [Problem(ProblemKind.NOT_COMMITTED,
                        f"{where} was never committed (it holds {backend.list_dir(path)[:6]}): a save is "
                        "running or crashed, and loads ignore it; discard_partial_checkpoints removes it")]

    files = RecordFiles.read(backend, path)
    problems: list[Problem] = []
    manifest: CheckpointManifest | None = None
    records: list[ItemRecord] | None = None
    if state is CheckpointState.COMMITTED:
        manifest, found = record_problems(files, where)
        problems += found
        parsed, found = parse_index(files.index, where)
        problems += found
        records = parsed if not found else None
    elif files.metadata is None:  # LEGACY implies .metadata; it vanished while we looked
        problems.append(Problem(ProblemKind.MISSING_FILE, f"{where} is missing {METADATA_FILE}", METADATA_FILE))

    metadata = _load_metadata(files.metadata, where, problems)
    if metadata is not None:
        problems += _metadata_problems(metadata, records, where)
    if manifest is not None and records is not None:
        problems += _manifest_problems(manifest, records, where)

    if records is not None:
        extents = [_Extent(r.file, r.offset, r.length, r.checksum, r.component, r.fqn, r.data_offset,
                           recorded_layout(r.data_offset, r.dtype, r.chunk_sizes, r.length)) for r in records]
    elif state is CheckpointState.LEGACY and metadata is not None and not problems:
        extents = [_Extent(info.relative_path, info.offset, info.length, None, top_level_key(index.fqn), index.fqn)
                   for index, info in metadata.storage_data.items()]
    else:
        extents = []  # no trustworthy list of items: their problems are reported above
    problems += _data_problems(backend, path, where, extents, thread_count, progress)
    return problems


def _load_metadata(data: bytes | None, where: str, problems: list[Problem]) -> Metadata | None:
    if data is None:
        return None
    try:
        metadata = load_dcp_metadata(data, name=f"{where}/{METADATA_FILE}")
    except UnsafeCheckpointError as err:
        problems.append(Problem(ProblemKind.UNSAFE, str(err), METADATA_FILE))
        return None
    except IntegrityError as err:
        problems.append(Problem(ProblemKind.MALFORMED, str(err), METADATA_FILE))
        return None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        problems.append(Problem(ProblemKind.MALFORMED, f"{where}/{METADATA_FILE} is not DCP metadata with "
                                "storage locations", METADATA_FILE))
        return None
    return metadata


def _metadata_problems(metadata: Metadata, records: Sequence[ItemRecord] | None, where: str) -> list[Problem]:
    """DCP's metadata, its storage locations and (when present) the index describe the same items."""
    problems = storage_location_problems(metadata, where)
    if problems:
        return problems
    locations = metadata.storage_data
    for fqn, md in sorted(metadata.state_dict_metadata.items()):
        component = top_level_key(fqn)
        if isinstance(md, BytesStorageMetadata):
            wanted = [MetadataIndex(fqn)]
        elif isinstance(md, TensorStorageMetadata):
            wanted = [MetadataIndex(fqn, chunk.offsets) for chunk in md.chunks]
            covered = sum(math.prod(chunk.sizes) for chunk in md.chunks)
            if covered != math.prod(md.size):
                problems.append(Problem(
                    ProblemKind.INCOMPLETE, f"{where}/{METADATA_FILE}: the chunks of {fqn!r} cover {covered} of "
                    f"its {math.prod(md.size)} elements", METADATA_FILE, component))
        else:
            problems.append(Problem(ProblemKind.MALFORMED, f"{where}/{METADATA_FILE}: {fqn!r} has unknown "
                                    f"metadata {type(md).__name__}", METADATA_FILE, component))
            continue
        missing = [index for index in wanted if index not in locations]
        if missing:
            problems.append(Problem(
                ProblemKind.INCOMPLETE, f"{where}/{METADATA_FILE}: {len(missing)} stored piece(s) of {fqn!r} "
                f"have no location (e.g. offsets {tuple(missing[0].offset or ())})", METADATA_FILE, component))
    if records is None:
        return problems

    by_location = {(r.file, r.offset): r for r in records}
    listed: set[tuple[str, int]] = set()
    for index, info in sorted(locations.items(), key=lambda kv: (kv[0].fqn, tuple(kv[0].offset or ()))):
        where_stored = (info.relative_path, info.offset)
        listed.add(where_stored)
        record = by_location.get(where_stored)
        component = top_level_key(index.fqn)
        if record is None:
            problems.append(Problem(
                ProblemKind.INCOMPLETE, f"{where}/{INDEX_FILE} has no row for {index.fqn!r} stored in "
                f"{info.relative_path} at byte {info.offset} ({METADATA_FILE} lists it)", INDEX_FILE, component))
        elif record.fqn != index.fqn or record.length != info.length:
            problems.append(Problem(
                ProblemKind.INCOMPLETE, f"{where}: {INDEX_FILE} and {METADATA_FILE} disagree about "
                f"{info.relative_path} at byte {info.offset}: index has {record.fqn!r} ({record.length} bytes), "
                f"metadata has {index.fqn!r} ({info.length} bytes)", INDEX_FILE, record.component))
    for record in records:
        if record.location not in listed:
            problems.append(Problem(
                ProblemKind.INCOMPLETE, f"{where}/{INDEX_FILE} lists {record.fqn!r} in {record.file} at byte "
                f"{record.offset}, which {METADATA_FILE} does not know", INDEX_FILE, record.component))
    return problems


def _manifest_problems(manifest: CheckpointManifest, records: Sequence[ItemRecord], where: str) -> list[Problem]:
    """The manifest's per-copy sizes and checksums are what the index's rows add up to."""
    by_copy: dict[tuple[str, str], list[ItemRecord]] = defaultdict(list)
    for r in records:
        by_copy[(r.component, r.storage_key)].append(r)
    in_index = {component for component, _ in by_copy}
    problems = []
    for component in sorted(in_index ^ set(manifest.components)):
        side = MANIFEST_FILE if component in manifest.components else INDEX_FILE
        problems.append(Problem(ProblemKind.INCOMPLETE, f"{where}: component {component!r} is only in {side} "
                                f"(the manifest and the index must list the same components)", MANIFEST_FILE,
                                component))
    for component in sorted(in_index & set(manifest.components)):
        copies = manifest.components[component].copies
        stored = {skey: rows for (comp, skey), rows in by_copy.items() if comp == component}
        for skey in sorted(set(stored) ^ set(copies)):
            side = MANIFEST_FILE if skey in copies else INDEX_FILE
            problems.append(Problem(ProblemKind.INCOMPLETE, f"{where}: copy {skey!r} of component {component!r} "
                                    f"is only in {side}", MANIFEST_FILE, component))
        for skey in sorted(set(stored) & set(copies)):
            rows, copy = stored[skey], copies[skey]
            size, checksum = sum(r.length for r in rows), combine_checksums([r.checksum for r in rows])
            if (size, checksum) != (copy.size_bytes, copy.checksum):
                problems.append(Problem(
                    ProblemKind.INCOMPLETE, f"{where}/{MANIFEST_FILE}: copy {skey!r} of component {component!r} "
                    f"records {copy.size_bytes} bytes with checksum {copy.checksum}, the index adds up to "
                    f"{size} bytes with checksum {checksum}", MANIFEST_FILE, component))
    return problems


def _data_problems(backend: StorageBackend, path: str, where: str, extents: Sequence[_Extent], thread_count: int,
                   progress: Callable[[int], None] | None) -> list[Problem]:
    per_file: dict[str, list[_Extent]] = defaultdict(list)
    for extent in extents:
        per_file[extent.file].append(extent)
    if not per_file:
        return []
    with ThreadPoolExecutor(max_workers=min(thread_count, len(per_file)), thread_name_prefix="forge-verify") as pool:
        results = pool.map(lambda item: _file_problems(backend, path, where, item[0], item[1], progress),
                           sorted(per_file.items()))
        return [problem for found in results for problem in found]


def _file_problems(backend: StorageBackend, path: str, where: str, name: str, extents: list[_Extent],
                   progress: Callable[[int], None] | None) -> list[Problem]:
    extents = sorted(extents, key=lambda e: e.offset)
    components = sorted({e.component for e in extents})
    full = backend.join(path, name)
    try:
        size = backend.fs.size(full)
        handle = backend.open_input(full)
    except FileNotFoundError:
        return [Problem(ProblemKind.MISSING_FILE, f"{where}: data file {name} is missing; it holds "
                        f"{len(extents)} item(s) of component(s) {components}", name, components[0])]
    problems = []
    buffer = memoryview(bytearray(_READ_PIECE))
    try:
        for extent in extents:
            end = extent.offset + extent.length
            if end > size:
                cut = [e for e in extents if e.offset + e.length > size]
                problems.append(Problem(
                    ProblemKind.TRUNCATED, f"{where}: data file {name} is truncated: it has {size} bytes, "
                    f"{extent.fqn!r} (component {extent.component!r}) ends at byte {end}; {len(cut)} item(s) "
                    f"are cut off", name, extent.component))
                break
            if extent.checksum is None:
                continue
            hasher = xxhash.xxh3_64()
            edges = BlobEdges() if extent.data_offset is not None else None
            done = 0
            while done < extent.length:
                piece = buffer[:min(_READ_PIECE, extent.length - done)]
                handle.read_into(extent.offset + done, piece)
                hasher.update(piece)
                if edges is not None:
                    edges.update(piece)
                done += len(piece)
                if progress is not None:
                    progress(len(piece))
            if hasher.hexdigest() != extent.checksum:
                problems.append(Problem(
                    ProblemKind.CHECKSUM_MISMATCH, f"{where}: checksum mismatch in data file {name} at byte "
                    f"{extent.offset} for component {extent.component!r} ({extent.fqn!r}): expected "
                    f"{extent.checksum}, found {hasher.hexdigest()}", name, extent.component))
            elif edges is not None and (found := edges.layout(extent.length)) != extent.layout:
                recorded = extent.layout or f"a tensor at byte {extent.data_offset}"
                problems.append(Problem(
                    ProblemKind.WRONG_LAYOUT, f"{where}: {INDEX_FILE} says the item of {extent.fqn!r} (component "
                    f"{extent.component!r}) in data file {name} at byte {extent.offset} holds {recorded}; its "
                    f"zip records say it holds {describe_layout(found)}", INDEX_FILE, extent.component))
    except EOFError as err:  # the file shrank while being read
        problems.append(Problem(ProblemKind.TRUNCATED, f"{where}: data file {name} is truncated ({err})", name,
                                components[0]))
    finally:
        handle.close()
    written_end = max(e.offset + e.length for e in extents)
    if size > written_end:
        problems.append(Problem(
            ProblemKind.TRAILING_BYTES, f"{where}: data file {name} has {size - written_end} bytes after its last "
            f"item (ends at {written_end}, file has {size}): it was appended to or replaced", name, components[0]))
    return problems

