"""``verify_checkpoint``: recompute every checksum of a checkpoint and check that it is complete.

What is checked, in order (docs/FORMAT.md describes the files):

1. the checkpoint is committed (``_COMMITTED`` exists), or is a plain DCP checkpoint (one holding
   none of dcp_forge's records, whose ``.metadata`` does not say dcp_forge wrote it);
2. the chain of records: the commit marker vouches for the manifest, the manifest for ``.metadata``
   and ``index.parquet`` (a stale or swapped manifest, metadata or index is caught here);
3. ``.metadata`` unpickles with the restricted loader and points only at files in the directory,
   with non-negative offsets and lengths;
4. the records agree (storage/cross_check.py, the same checks every load runs): every item DCP's
   metadata lists has a stored location, each location is the index's row for that item (fqn,
   chunk, length, kind, dtype, shape), the chunks of every tensor tile it exactly, and the manifest
   is what the index and its own topology add up to;
5. the data files: each is a plain file (no symbolic link), none is shorter (truncated) or longer
   than its items, every item's bytes hash to the xxh3 the index recorded, every tensor item holds
   the dtype and shape the records give it (where the index records where a tensor starts inside its
   blob, ``data_offset``, the blob's own zip records say the same), and every stored value unpickles
   with the restricted loader (plain DCP checkpoints record no checksums: presence, extents and
   values are checked). A packed item (format/pack.py) is checked over the bytes it owns, and its
   zip records (what plain DCP reads from its range) must be exactly those of what its row records.

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

import torch
import xxhash
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from ..core.coverage import metadata_gaps
from ..core.placement import index_key
from ..core.tensors import dtype_named
from ..errors import IntegrityError
from ..format.index import ItemRecord, own_pieces
from ..format.manifest import CheckpointManifest
from ..format.names import INDEX_FILE, METADATA_FILE, stripped_checkpoint_message, written_by_dcp_forge
from ..format.pack import (
    DATA_OFFSET,
    data_header,
    records_problem,
    shared_records_problem,
    trailer_problem,
    value_zip,
)
from ..format.safe_load import UnsafeCheckpointError, load_dcp_metadata, load_object
from ..format.torch_blob import (
    BlobEdges,
    NotPlainTensor,
    TensorBlobLayout,
    describe_layout,
    open_blob,
    recorded_layout,
    tensor_blob_layout,
)
from ..storage import (
    CheckpointState,
    InputFile,
    ItemCheck,
    Problem,
    ProblemKind,
    RecordFiles,
    StorageBackend,
    StoredChunk,
    checkpoint_state,
    component_of,
    coverage_problems,
    extent_problem,
    manifest_problems,
    open_backend,
    open_data_file,
    parse_index,
    record_problems,
    redact_url,
    storage_location_problems,
    stored_tensor,
)

__all__ = ["Problem", "ProblemKind", "verify_checkpoint"]

# Data is hashed in pieces of this size, so verifying a 100 GB checkpoint needs little memory.
_READ_PIECE = 8 * 1024 * 1024


@dataclass(frozen=True)
class _Extent:
    """One stored item: where it is, what it holds and (when recorded) the checksum of its bytes and
    where its tensor starts inside it."""

    file: str
    offset: int
    length: int
    checksum: str | None
    component: str
    fqn: str
    kind: str  # "tensor" or "bytes"
    chunk: StoredChunk | None = None  # the dtype and shape the records give a tensor item
    data_offset: int | None = None
    layout: TensorBlobLayout | None = None  # the tensor the index describes at data_offset
    gap: tuple[int, int] | None = None  # a packed item's gap: the bytes of other items in its range

    def describe(self) -> str:
        return f"{self.fqn!r} (component {self.component!r})"


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
                        "running or crashed, or its commit marker was removed, and loads refuse it; "
                        "discard_partial_checkpoints removes it")]

    try:
        files = RecordFiles.read(backend, path)
    except UnsafeCheckpointError as err:
        return [Problem(ProblemKind.UNSAFE, f"{where}: {err}")]
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
    if metadata is not None and state is CheckpointState.LEGACY and written_by_dcp_forge(metadata.storage_meta):
        problems.append(Problem(ProblemKind.NOT_COMMITTED, stripped_checkpoint_message(where), METADATA_FILE))
    check = None
    if metadata is not None:
        found = _metadata_problems(metadata, records, where)
        problems += found
        if not found:
            check = ItemCheck(metadata, records, where)
    if manifest is not None and records is not None:
        problems += manifest_problems(manifest, records, where)

    if records is not None:
        extents = [_Extent(r.file, r.offset, r.length, r.checksum, r.component, r.fqn, r.kind,
                           _recorded_chunk(r), r.data_offset,
                           recorded_layout(r.data_offset, r.dtype, r.chunk_sizes, r.length, r.math_bits),
                           None if r.gap_offset is None or r.gap_length is None else (r.gap_offset, r.gap_length))
                   for r in records]
    elif state is CheckpointState.LEGACY and metadata is not None and check is not None and not problems:
        extents = [_Extent(info.relative_path, info.offset, info.length, None, component_of(index.fqn), index.fqn,
                           "tensor" if check.chunk(index) is not None else "bytes", check.chunk(index))
                   for index, info in metadata.storage_data.items()]
    else:
        extents = []  # no trustworthy list of items: their problems are reported above
    problems += _data_problems(backend, path, where, extents, thread_count, progress)
    return problems


def _recorded_chunk(record: ItemRecord) -> StoredChunk | None:
    dtype = dtype_named(record.dtype) if record.dtype is not None else None
    if record.kind != "tensor" or dtype is None or record.chunk_sizes is None:
        return None
    return StoredChunk(dtype, tuple(record.chunk_sizes))


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
    """DCP's metadata, its storage locations and (when present) the index describe the same items,
    and every tensor's chunks tile it."""
    problems = storage_location_problems(metadata, where)
    if problems:
        return problems
    locations = metadata.storage_data
    for fqn, md in sorted(metadata.state_dict_metadata.items()):
        if not isinstance(md, (BytesStorageMetadata, TensorStorageMetadata)):
            problems.append(Problem(ProblemKind.MALFORMED, f"{where}/{METADATA_FILE}: {fqn!r} has unknown "
                                    f"metadata {type(md).__name__}", METADATA_FILE, component_of(fqn)))
    # One walk over the metadata finds its pieces without a location and the tensors whose tiling needs checking.
    gaps = metadata_gaps(metadata, set(map(index_key, locations)))
    for fqn, missing in gaps.unstored.items():
        problems.append(Problem(
            ProblemKind.INCOMPLETE, f"{where}/{METADATA_FILE}: {len(missing)} stored piece(s) of {fqn!r} "
            f"have no location (e.g. offsets {tuple(missing[0].offset or ())})", METADATA_FILE, component_of(fqn)))
    problems += coverage_problems(metadata, gaps.not_whole, where)

    check = ItemCheck(metadata, records, where)
    listed: set[tuple[str, int]] = set()
    for index, info in sorted(locations.items(), key=lambda kv: (kv[0].fqn, tuple(kv[0].offset or ()))):
        listed.add((info.relative_path, info.offset))
        problem = check.problem(index, info)
        if problem is not None:
            problems.append(problem)
    for record in records or ():
        if record.location not in listed:
            problems.append(Problem(
                ProblemKind.INCOMPLETE, f"{where}/{INDEX_FILE} lists {record.fqn!r} in {record.file} at byte "
                f"{record.offset}, which {METADATA_FILE} does not know", INDEX_FILE, record.component))
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
    holds = f"{len(extents)} item(s) of component(s) {components}"
    try:
        handle = open_data_file(backend, path, name, where, holds)
    except UnsafeCheckpointError as err:
        return [Problem(ProblemKind.UNSAFE, str(err), name, components[0])]
    except IntegrityError:
        return [Problem(ProblemKind.MISSING_FILE, f"{where}: data file {name} is missing; it holds {holds}", name,
                        components[0])]
    problems = []
    buffer = memoryview(bytearray(_READ_PIECE))
    try:
        size = handle.size()
        packed: list[_Extent] = []  # consecutive packed items whose ranges overlap: read together
        for i, extent in enumerate(extents):
            bad = extent_problem(where, name, size, extent.offset, extent.length, extent.describe())
            if bad is not None:
                cut = [e for e in extents if e.offset + e.length > size]
                problems.append(Problem(ProblemKind.TRUNCATED, f"{bad}; {len(cut)} item(s) are cut off", name,
                                        extent.component))
                break
            if extent.gap is not None:
                packed.append(extent)
                following = extents[i + 1] if i + 1 < len(extents) else None
                if following is None or following.gap is None or following.offset >= max(
                        e.offset + e.length for e in packed):
                    problems += _pack_problems(where, handle, packed, progress)
                    packed = []
                continue
            if extent.checksum is None:
                problems += _value_problems(where, handle, extent, None)
                continue
            hasher = xxhash.xxh3_64()
            edges = BlobEdges() if extent.kind == "tensor" else None
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
                problems.append(_checksum_problem(where, extent, hasher.hexdigest()))
            else:
                problems += _value_problems(where, handle, extent, edges)
        if packed:  # the items read up to a truncation
            problems += _pack_problems(where, handle, packed, progress)
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


def _checksum_problem(where: str, extent: _Extent, found: str) -> Problem:
    return Problem(ProblemKind.CHECKSUM_MISMATCH, f"{where}: checksum mismatch in data file {extent.file} at byte "
                   f"{extent.offset} for component {extent.component!r} ({extent.fqn!r}): expected "
                   f"{extent.checksum}, found {found}", extent.file, extent.component)


def _pack_problems(where: str, handle: InputFile, extents: Sequence[_Extent],
                   progress: Callable[[int], None] | None) -> list[Problem]:
    """The problems of packed items whose ranges overlap (format/pack.py): each one's checksum over the
    bytes it owns, its zip records (what plain DCP reads) against its index row, the pack's version
    record it names, and a value's pickle against the restricted loader. A small pack is read at
    once; the items of a large one piece by piece."""
    start = extents[0].offset
    span = max(e.offset + e.length for e in extents) - start
    if span <= _READ_PIECE:
        data = memoryview(_read_at(handle, start, span))

        def read_at(offset: int, size: int) -> memoryview:
            return data[offset - start:offset - start + size]
    else:
        def read_at(offset: int, size: int) -> memoryview:
            return memoryview(_read_at(handle, offset, size))
    problems = []
    for extent in extents:
        (head_at, head_length), (tail_at, tail_length) = own_pieces(extent.length, *(extent.gap or (extent.length, 0)))
        hasher = xxhash.xxh3_64()
        for piece_at in range(0, head_length, _READ_PIECE):
            hasher.update(read_at(extent.offset + piece_at, min(_READ_PIECE, head_length - piece_at)))
        tail = read_at(extent.offset + tail_at, tail_length)
        hasher.update(tail)
        if progress is not None:
            progress(head_length + tail_length)
        if extent.checksum is not None and hasher.hexdigest() != extent.checksum:
            problems.append(_checksum_problem(where, extent, hasher.hexdigest()))
            continue
        at = f"{where}: the packed item of {extent.describe()} in data file {extent.file} at byte {extent.offset}"
        if extent.kind == "tensor" and (extent.chunk is None or extent.data_offset != DATA_OFFSET
                                        or extent.layout is None or extent.layout.math_bits is not None):
            problems.append(Problem(ProblemKind.WRONG_LAYOUT, f"{at}: its index row records no plain tensor at byte "
                                    f"{DATA_OFFSET} of it (data offset {extent.data_offset})", INDEX_FILE,
                                    extent.component))
            continue
        head = read_at(extent.offset, min(head_length, DATA_OFFSET) if extent.kind == "tensor" else head_length)
        described = (extent.chunk.dtype, extent.chunk.sizes) if extent.chunk is not None else None
        if described is not None:
            nbytes = math.prod(described[1]) * described[0].itemsize
            why = (None if head_length == DATA_OFFSET + nbytes and head == data_header(nbytes) else
                   f"its head is not the data record of a {described[0]} tensor {list(described[1])}")
            why = why or trailer_problem(tail, tail_at, described)
        else:
            why = records_problem(head, tail, tail_at, None)

        def read_in_item(at: int, size: int, item_at: int = extent.offset) -> memoryview:
            return read_at(item_at + at, size)

        why = why or shared_records_problem(tail, tail_at, described, read_in_item)
        if why is not None:
            problems.append(Problem(ProblemKind.WRONG_LAYOUT, f"{at}: {why}", extent.file, extent.component))
        elif extent.kind != "tensor":
            try:
                load_object(value_zip(head), name=f"{extent.component}: {extent.fqn}")
            except UnsafeCheckpointError as err:
                problems.append(Problem(ProblemKind.UNSAFE, f"{at}: {err}", extent.file, extent.component))
            except IntegrityError as err:
                problems.append(Problem(ProblemKind.MALFORMED, f"{at}: {err}", extent.file, extent.component))
    return problems


def _read_at(handle: InputFile, offset: int, size: int) -> bytearray:
    data = bytearray(size)
    handle.read_into(offset, memoryview(data))
    return data


def _whole(handle: InputFile, extent: _Extent) -> bytearray:
    return _read_at(handle, extent.offset, extent.length)


def _value_problems(where: str, handle: InputFile, extent: _Extent, edges: BlobEdges | None) -> list[Problem]:
    """What a load would refuse in the stored value itself: a pickle that needs more than the
    restricted loader allows, a tensor item holding no tensor or another dtype or shape than its
    records say, or a tensor elsewhere in its blob than the index says (``edges``: the blob's edges,
    when its bytes were streamed already)."""
    name = f"{extent.component}: {extent.fqn}"
    at = f"{where}: the item of {extent.describe()} in data file {extent.file} at byte {extent.offset}"
    try:
        if extent.kind != "tensor":
            load_object(_whole(handle, extent), name=name)
            return []
        if edges is not None:
            found = edges.layout(extent.length)
        else:
            try:
                found = tensor_blob_layout(open_blob(lambda o, n: bytes(_read_at(handle, extent.offset + o, n)),
                                                     extent.length))
            except NotPlainTensor:
                found = None
        if found is None:
            tensor = stored_tensor(torch.frombuffer(_whole(handle, extent), dtype=torch.uint8), name)
            dtype, shape = tensor.dtype, tuple(tensor.shape)
        else:
            dtype, shape = found.dtype, found.shape
    except UnsafeCheckpointError as err:
        return [Problem(ProblemKind.UNSAFE, f"{at}: {err}", extent.file, extent.component)]
    except IntegrityError as err:
        return [Problem(ProblemKind.MALFORMED, f"{at}: {err}", extent.file, extent.component)]
    if extent.chunk is not None and (dtype, shape) != (extent.chunk.dtype, extent.chunk.sizes):
        return [Problem(ProblemKind.WRONG_LAYOUT, f"{at} holds a {dtype} tensor {list(shape)}; its records say a "
                        f"{extent.chunk.dtype} tensor {list(extent.chunk.sizes)}", extent.file, extent.component)]
    if extent.data_offset is not None and found != extent.layout:
        recorded = extent.layout or f"a tensor at byte {extent.data_offset}"
        return [Problem(
            ProblemKind.WRONG_LAYOUT, f"{where}: {INDEX_FILE} says the item of {extent.fqn!r} (component "
            f"{extent.component!r}) in data file {extent.file} at byte {extent.offset} holds {recorded}; its "
            f"zip records say it holds {describe_layout(found)}", INDEX_FILE, extent.component)]
    return []
