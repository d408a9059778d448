"""Reading stored items into their destinations: straight into the destination tensor when possible.

DCP's own reader reads every stored tensor into a buffer, ``torch.load``s it (a second copy) and
copies it into the destination (a third). Here a stored tensor that one destination takes whole, as a
contiguous CPU tensor of the same dtype, shape and lazy conjugate / negative flags, is read directly
into that destination's memory.
Where ``index.parquet`` records where the tensor starts (``data_offset``, dcp_forge's own
checkpoints), the whole blob is one ``read_scatter``: its small header into one buffer, the tensor
into the destination, its trailer into another, then the header and trailer are parsed to prove the
index right. Otherwise (plain DCP checkpoints, older indexes) header and trailer are read first to
locate the data record (torch_blob.py), then the data. Either way the checksum is computed over
header, destination bytes and trailer, in file order, so it is the same xxh3 as over the stored blob.

A packed item (format/pack.py) is cut out of bytes already in memory where a batch of small items was
read together (read_batches.py), or, a large packed tensor, read straight into its destination after
its trailer (the trailers of a large pack lie together and arrive with one request); its checksum
covers the bytes it owns, and its zip records must be exactly the ones its index row implies.

Everything else takes the staged path: the whole blob is read into one uninitialised buffer, hashed,
and the tensor is viewed inside it (no ``torch.load`` copy) before being copied into each destination
(storage to storage where both carry the same flags, so no value is recomputed); blobs that are not
one plain tensor go through ``torch.load`` as before. A quantized tensor stored as a tensor item
(plain DCP) loads only into a destination quantized alike: ``copy_`` would keep the destination's
scales and zero points.

A read that fails (truncation, checksum mismatch) raises after the bytes reached the destination: a
failed load leaves the destination state partly overwritten, as with DCP's reader, where earlier
items are already in place.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlanner, ReadItem

from ..core.keys import top_level_key
from ..core.tensors import copy_exactly, math_bits, narrow_box, raw_view, with_math_bits
from ..errors import IntegrityError, StateMismatchError
from ..format.index import ItemRecord, file_pieces, own_pieces
from ..format.names import METADATA_FILE
from ..format.pack import (
    DATA_OFFSET,
    data_header,
    records_problem,
    trailer_problem,
    value_zip,
)
from ..format.safe_load import load_object
from ..format.torch_blob import (
    NotPlainTensor,
    TensorBlobLayout,
    describe_layout,
    layout_from_edges,
    open_blob,
    recorded_layout,
    tensor_blob_layout,
)
from .backends import InputFile
from .consistency import component_of, raise_if_problems
from .cross_check import ItemCheck, StoredChunk

# Below this, reading header and trailer separately costs more than one read of the whole blob.
DIRECT_MIN_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StoredRead:
    """One stored item (``length`` bytes at ``offset`` of ``file``) and the read items it serves;
    ``layout``: where the tensor is inside it, when the index records that; ``chunk``: the dtype and
    shape ``.metadata`` says the stored tensor has (a blob that holds another is refused)."""

    file: str
    offset: int
    length: int
    items: tuple[ReadItem, ...]
    layout: TensorBlobLayout | None = None
    chunk: StoredChunk | None = None
    gap: tuple[int, int] | None = None  # a packed item's gap (offset from ``offset``, length): pack.py

    @functools.cached_property
    def pieces(self) -> tuple[tuple[int, int], ...]:
        """(offset in the file, length) of the bytes this item owns, which its checksum covers."""
        return file_pieces(self.offset, self.length, self.gap)

    @property
    def stored_bytes(self) -> int:
        """The bytes this item owns (its range without its gap): what reading it reads."""
        return self.length - (self.gap[1] if self.gap is not None else 0)

    @property
    def fqn(self) -> str:
        return self.items[0].storage_index.fqn

    def describe(self) -> str:
        """The item, for messages: its key and component."""
        return f"{self.fqn!r} (component {component_of(self.fqn)!r})"


# ``check(read, xxh3 hex digest of its bytes)`` raises if the digest is wrong; None skips hashing.
Checker = Callable[[StoredRead, str], None] | None
# What applies one stored item read from a handle: ``load_stored_item``'s signature.
ItemLoader = Callable[[InputFile, StoredRead, LoadPlanner, Checker], None]


def group_reads(items: Sequence[ReadItem], storage_data: Mapping[MetadataIndex, Any],
                records: Mapping[tuple[str, int], ItemRecord] | None = None,
                check: ItemCheck | None = None) -> list[StoredRead]:
    """Read items grouped by the stored item they need, in file order (each stored item read once),
    with the tensor layouts that ``records`` (the index rows by location) hold.

    With ``check``, every stored location is first checked against the records (cross_check.py):
    one that the index and ``.metadata`` do not agree on raises before anything is read.
    """
    # location -> (its .metadata entry, the read items it serves), each location looked up once
    grouped: dict[tuple[str, int, int], tuple[Any, list[ReadItem]]] = {}
    for item in items:
        info = storage_data.get(item.storage_index)
        if info is None:
            raise IntegrityError(f"{METADATA_FILE} has no stored location for chunk {list(item.storage_index.offset or ())} "
                                 f"of {item.storage_index.fqn!r} (component {component_of(item.storage_index.fqn)!r})")
        location = (info.relative_path, info.offset, info.length)
        entry = grouped.get(location)
        if entry is None:
            grouped[location] = (info, [item])
        else:
            entry[1].append(item)
    records = records or {}
    reads = []
    for (file, offset, length), (info, its) in sorted(grouped.items()):  # locations are unique: sorted by them
        chunk = None
        if check is not None:
            if len(its) == 1:  # most locations serve one read item
                problem, chunk = check.checked(its[0].storage_index, info)
                if problem is not None:
                    raise_if_problems([problem])
            else:
                for i, index in enumerate(dict.fromkeys(item.storage_index for item in its)):  # each claiming it
                    problem, found = check.checked(index, storage_data[index])
                    if problem is not None:
                        raise_if_problems([problem])
                    if i == 0:
                        chunk = found
        record = records.get((file, offset))
        layout = gap = None
        if record is not None:
            layout = recorded_layout(record.data_offset, record.dtype, record.chunk_sizes, length, record.math_bits)
            if record.gap_offset is not None and record.gap_length is not None:
                gap = (record.gap_offset, record.gap_length)
        reads.append(StoredRead(file, offset, length, tuple(its), layout, chunk, gap))
    return reads


def split_runs(reads: Sequence[StoredRead], parts: int) -> list[list[StoredRead]]:
    """``reads`` (in file order) cut into at most ``parts`` consecutive runs of about equal bytes.

    Consecutive runs keep each thread's reads sequential within a file; the cut points fall where the
    running byte count crosses each 1/parts of the total.
    """
    total = sum(r.length for r in reads)
    runs: list[list[StoredRead]] = []
    current: list[StoredRead] = []
    done = 0
    for read in reads:
        current.append(read)
        done += read.length
        if len(runs) < parts - 1 and done * parts >= total * (len(runs) + 1):
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _read_bytes(handle: InputFile, offset: int, size: int) -> bytes:
    buffer = bytearray(size)
    handle.read_into(offset, memoryview(buffer))
    return bytes(buffer)


def _direct_target(read: StoredRead, targets: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The destination that can take this stored tensor's bytes as they are, if there is one."""
    if len(read.items) != 1 or any(read.items[0].storage_offsets):
        return None
    target = targets[0]
    if (type(target) is not torch.Tensor or target.device.type != "cpu" or target.layout != torch.strided
            or not target.is_contiguous() or target.is_quantized):
        return None
    return target


def byte_view(tensor: torch.Tensor) -> memoryview:
    return tensor.reshape(-1).view(torch.uint8).numpy().data


class PipelinedChecker:
    """A Checker that lets the direct path hash on ``pool`` while the reading thread reads on.

    Hashing a directly read tensor (xxh3, with the GIL released) would otherwise sit
    between two reads of the same thread, with its disk stream idle unless prefetching covers it.
    ``wait`` (before the read returns) waits for every hash and raises the first failed check. Only
    the hashing moves: every read still happens on the reading thread, in file order.
    """

    def __init__(self, check: Callable[[StoredRead, str], None], pool: Executor) -> None:
        self._check = check
        self._pool = pool
        self._pending: list[Future] = []

    def __call__(self, read: StoredRead, found: str) -> None:
        self._check(read, found)

    def submit(self, job: Callable[[], None]) -> None:
        self._pending.append(self._pool.submit(job))  # list.append is atomic: reading threads share it

    def wait(self) -> None:
        errors = []
        for future in self._pending:
            try:
                future.result()
            except BaseException as err:  # wait for all of them: they read destination memory
                errors.append(err)
        self._pending.clear()
        if errors:
            raise errors[0]


def _stored_layout(handle: InputFile, read: StoredRead) -> tuple[TensorBlobLayout | None, Any]:
    """Where the stored tensor is (the index's record, else parsed from the blob's edges), and the
    parsed blob's edges (None when the index told)."""
    if read.layout is not None:
        return read.layout, None
    if read.length < DIRECT_MIN_BYTES:
        return None, None
    blob = open_blob(lambda o, n: _read_bytes(handle, read.offset + o, n), read.length)
    try:
        return tensor_blob_layout(blob), blob
    except NotPlainTensor:
        return None, None


def _read_direct(handle: InputFile, read: StoredRead, layout: TensorBlobLayout, edges: Any,
                 target: torch.Tensor, check: Checker) -> None:
    """Read the tensor into ``target``: with its blob's head and tail in the same request when the
    index told where it is (``edges`` None), else the data alone after the parsed ``edges``."""
    view = byte_view(raw_view(target)) if layout.nbytes else memoryview(b"")  # its flags match the blob's
    end = layout.data_offset + layout.nbytes
    if check is None:
        handle.read_into(read.offset + layout.data_offset, view)
        return
    if edges is None:
        head, tail = bytearray(layout.data_offset), bytearray(read.length - end)
        handle.read_scatter(read.offset, [memoryview(head), view, memoryview(tail)])
    else:
        handle.read_into(read.offset + layout.data_offset, view)
        head, tail = edges.fetch(0, layout.data_offset), edges.fetch(end, read.length - end)

    def verify() -> None:
        hasher = xxhash.xxh3_64()
        hasher.update(head)
        hasher.update(view)
        hasher.update(tail)
        check(read, hasher.hexdigest())
        # The checksum covers the blob however it was split, so also prove the split: the edges read
        # must place the tensor where the index said.
        if edges is None and (found := layout_from_edges(head, tail, read.length)) != layout:
            raise IntegrityError(
                f"stored item of {top_level_key(read.fqn)!r} ({read.fqn!r}) in {read.file} at byte {read.offset}: "
                f"the index says it holds {layout}, its zip records say it holds {describe_layout(found)}")

    if isinstance(check, PipelinedChecker):
        check.submit(verify)
    else:
        verify()


def read_blob(handle: InputFile, offset: int, length: int) -> torch.Tensor:
    """``length`` bytes at ``offset`` as an uninitialised-then-filled uint8 tensor (no zeroing pass)."""
    buffer = torch.empty(length, dtype=torch.uint8)
    handle.read_into(offset, byte_view(buffer))
    return buffer


def stored_tensor(buffer: torch.Tensor, name: str) -> torch.Tensor:
    """The tensor a staged blob holds, as a view into ``buffer`` when it is one plain tensor.

    Any other blob is unpickled weights-only: one that needs more raises UnsafeCheckpointError, one
    that holds no tensor IntegrityError, each naming ``name`` (the component and key).
    """
    raw = byte_view(buffer)
    try:
        layout = tensor_blob_layout(open_blob(lambda o, n: raw[o:o + n].tobytes(), len(raw)))
    except NotPlainTensor:
        value = load_object(raw, name=name)
        if not isinstance(value, torch.Tensor):
            raise IntegrityError(f"the stored tensor {name!r} holds a {type(value).__name__}, not a tensor") from None
        return value
    if not layout.nbytes:
        return with_math_bits(torch.empty(layout.shape, dtype=layout.dtype), layout.math_bits)
    data = buffer[layout.data_offset:layout.data_offset + layout.nbytes]
    return with_math_bits(typed_view(data, layout), layout.math_bits)


def packed_tensor(head: torch.Tensor, tail: torch.Tensor, trailer_at: int, dtype: torch.dtype | None,
                  shape: tuple[int, ...], name: str) -> torch.Tensor:
    """The tensor a packed item's ``head`` and ``tail`` (uint8 tensors) hold, once its zip records are
    proven to be those of a ``dtype`` tensor of ``shape`` (IntegrityError naming ``name`` otherwise)."""
    if dtype is None:
        raise IntegrityError(f"packed item of {name!r}: its row names no known dtype")
    why = records_problem(byte_view(head), byte_view(tail), trailer_at, (dtype, shape))
    if why is not None:
        raise IntegrityError(f"packed item of {name!r}: {why}")
    layout = TensorBlobLayout(DATA_OFFSET, head.numel() - DATA_OFFSET, dtype, shape)
    return typed_view(head[DATA_OFFSET:], layout) if layout.nbytes else torch.empty(shape, dtype=dtype)


def packed_value_zip(head: torch.Tensor, tail: torch.Tensor, trailer_at: int, name: str) -> bytes:
    """The ``torch.save`` bytes of the value a packed item's ``head`` and ``tail`` hold, once its zip
    records are proven to be those of a pickled value (IntegrityError naming ``name`` otherwise)."""
    why = records_problem(byte_view(head), byte_view(tail), trailer_at, None)
    if why is not None:
        raise IntegrityError(f"packed item of {name!r}: {why}")
    return value_zip(byte_view(head))


def typed_view(data: torch.Tensor, layout: TensorBlobLayout) -> torch.Tensor:
    """The stored tensor over ``data`` (its uint8 bytes): a view, or a copy where the bytes do not start
    at a multiple of the dtype's size (packed items are not padded to one; torch views need it)."""
    if data.data_ptr() % layout.dtype.itemsize or data.storage_offset() % layout.dtype.itemsize:
        data = data.clone()
    return data.view(layout.dtype).reshape(layout.shape)


def _quantization(tensor: torch.Tensor) -> tuple:
    """What copying quantized values into a tensor cannot change: its quantizer."""
    scheme = tensor.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return scheme, tensor.q_scale(), tensor.q_zero_point()
    return (scheme, tensor.q_per_channel_axis(), tensor.q_per_channel_scales().tolist(),
            tensor.q_per_channel_zero_points().tolist())


def _check_quantization(source: torch.Tensor, target: torch.Tensor, item: ReadItem) -> None:
    """A quantized tensor stored as a tensor item (plain DCP, older dcp_forge) loads into a destination
    only when both quantize alike: ``copy_`` keeps the destination's scales and zero points and would
    give the stored integers other values."""
    found = _quantization(target) if target.is_quantized else "not quantized"
    if found != _quantization(source):
        raise StateMismatchError(
            f"stored quantized tensor {item.storage_index.fqn!r} ({top_level_key(item.storage_index.fqn)!r}) "
            f"has quantization {_quantization(source)}, its destination {found}: the values would change")


def _is_chunk(dtype: torch.dtype, shape: tuple[int, ...], chunk: StoredChunk | None) -> bool:
    """Whether a stored tensor of ``dtype`` and ``shape`` is the chunk the records describe (if they do)."""
    return chunk is None or (dtype == chunk.dtype and shape == chunk.sizes)


def _own_bytes(handle: InputFile, read: StoredRead, check: Checker) -> tuple[memoryview, memoryview]:
    """A packed item's head and trailer (lent by a handle holding them in memory, else read), their
    checksum verified."""
    (head_at, head_length), (tail_at, tail_length) = read.pieces
    lend = getattr(handle, "view", None)
    if lend is not None:
        head, tail = lend(head_at, head_length), lend(tail_at, tail_length)
    else:
        head, tail = memoryview(bytearray(head_length)), memoryview(bytearray(tail_length))
        handle.read_into(head_at, head)
        handle.read_into(tail_at, tail)
    if check is not None:
        hasher = xxhash.xxh3_64(head)
        hasher.update(tail)
        check(read, hasher.hexdigest())
    return head, tail


def _load_packed(handle: InputFile, read: StoredRead, planner: LoadPlanner, check: Checker) -> None:
    """A packed item (pack.py): its checksum over its own bytes, its zip records proven to say what the
    index says (so plain DCP would read the same), then its value from its head, or a tensor read
    straight into its destination."""
    assert read.gap is not None, "only a packed item has a gap"
    trailer_at = own_pieces(read.length, *read.gap)[1][0]
    if read.items[0].type == LoadItemType.BYTE_IO:
        head, tail = _own_bytes(handle, read, check)
        _refuse_packed(read, records_problem(head, tail, trailer_at, None))
        _load_value(read, planner, value_zip(head))
        return
    layout = read.layout
    if layout is None or layout.data_offset != DATA_OFFSET or layout.math_bits is not None:
        _refuse_packed(read, f"the index records no plain tensor in it ({describe_layout(layout)})")
        return
    if read.chunk is not None and not _is_chunk(layout.dtype, layout.shape, read.chunk):
        _refuse_packed(read, f"it holds a {layout.dtype} tensor {list(layout.shape)}; {METADATA_FILE} says a "
                             f"{read.chunk.dtype} tensor {list(read.chunk.sizes)}")
    targets = [planner.resolve_tensor(item).detach() for item in read.items]
    target = _direct_target(read, targets)
    if target is not None and (target.dtype != layout.dtype or tuple(target.shape) != layout.shape
                               or math_bits(target) is not None):
        target = None
    if target is not None and getattr(handle, "view", None) is None:
        _read_packed_direct(handle, read, layout, trailer_at, target, check)
        planner.commit_tensor(read.items[0], target)
        return
    head, tail = _own_bytes(handle, read, check)
    _refuse_packed(read, records_problem(head, tail, trailer_at, (layout.dtype, layout.shape)))
    data = head[DATA_OFFSET:]
    if target is not None:
        if layout.nbytes:
            byte_view(target)[:] = data
        planner.commit_tensor(read.items[0], target)
        return
    stored = (typed_view(torch.frombuffer(data, dtype=torch.uint8), layout) if layout.nbytes
              else torch.empty(layout.shape, dtype=layout.dtype))
    _apply(read, stored, targets, planner)


def _read_packed_direct(handle: InputFile, read: StoredRead, layout: TensorBlobLayout, trailer_at: int,
                        target: torch.Tensor, check: Checker) -> None:
    """A packed tensor read straight into ``target``: its trailer (checked against the index), then its
    bytes. The local header in front of them is not read: it follows from the index, and is hashed as
    such (a damaged one changes nothing a load fills; ``verify`` reads and reports it)."""
    (_, tail_length) = read.pieces[-1]
    tail = bytearray(tail_length)
    handle.read_into(read.offset + trailer_at, memoryview(tail))
    _refuse_packed(read, trailer_problem(tail, trailer_at, (layout.dtype, layout.shape)))
    view = byte_view(target) if layout.nbytes else memoryview(b"")
    if layout.nbytes:
        handle.read_into(read.offset + DATA_OFFSET, view)
    if check is None:
        return

    def verify() -> None:
        hasher = xxhash.xxh3_64(data_header(layout.nbytes))
        hasher.update(view)
        hasher.update(tail)
        check(read, hasher.hexdigest())

    if isinstance(check, PipelinedChecker):
        check.submit(verify)
    else:
        verify()


def _refuse_packed(read: StoredRead, why: str | None) -> None:
    if why is not None:
        raise IntegrityError(f"packed item of {read.describe()} in {read.file} at byte {read.offset}: {why}")


def _load_value(read: StoredRead, planner: LoadPlanner, data: Any) -> None:
    """Hand a stored value (``torch.save`` bytes) to every read item of it, vetted first."""
    if not getattr(planner, "unpickles_safely", False):
        # DCP's own planners unpickle with weights_only=False: vet the stream first with the
        # weights-only loader (which refuses any global it does not allow), so that a crafted
        # checkpoint cannot run code whichever planner reads it.
        load_object(data, name=read.items[0].storage_index.fqn)
    for item in read.items:
        planner.load_bytes(item, io.BytesIO(data))


def _apply(read: StoredRead, stored: torch.Tensor, targets: Sequence[torch.Tensor], planner: LoadPlanner) -> None:
    """Copy each read item's box of the stored tensor into its destination."""
    for item, target in zip(read.items, targets, strict=True):
        source = narrow_box(stored, item.storage_offsets, item.lengths)
        if target.size() != source.size():
            raise IntegrityError(
                f"stored chunk of {top_level_key(item.storage_index.fqn)!r} ({item.storage_index.fqn}) "
                f"has shape {tuple(source.size())}, destination expects {tuple(target.size())}")
        if source.is_quantized:
            _check_quantization(source, target, item)
        copy_exactly(target, source)
        planner.commit_tensor(item, target)


def load_stored_item(handle: InputFile, read: StoredRead, planner: LoadPlanner, check: Checker) -> None:
    """Read one stored item and hand it to every read item that needs it (see the module docstring).

    Raises EOFError when the file ends early, and whatever ``check`` raises on a wrong checksum.
    """
    if read.gap is not None:
        _load_packed(handle, read, planner, check)
        return
    if read.items[0].type == LoadItemType.BYTE_IO:
        data = bytearray(read.length)
        handle.read_into(read.offset, memoryview(data))
        if check is not None:
            check(read, xxhash.xxh3_64_hexdigest(data))
        _load_value(read, planner, data)
        return

    targets = [planner.resolve_tensor(item).detach() for item in read.items]
    target = _direct_target(read, targets)
    if target is not None:
        layout, edges = _stored_layout(handle, read)
        if (layout is not None and layout.dtype == target.dtype and layout.shape == tuple(target.shape)
                and _is_chunk(layout.dtype, layout.shape, read.chunk) and layout.math_bits == math_bits(target)):
            _read_direct(handle, read, layout, edges, target, check)
            planner.commit_tensor(read.items[0], target)
            return

    buffer = read_blob(handle, read.offset, read.length)
    if check is not None:
        check(read, xxhash.xxh3_64_hexdigest(byte_view(buffer)))
    stored = stored_tensor(buffer, f"{component_of(read.fqn)}: {read.fqn}")
    if read.chunk is not None and not _is_chunk(stored.dtype, tuple(stored.shape), read.chunk):
        raise IntegrityError(
            f"stored item of {read.describe()} in {read.file} at byte {read.offset} holds a {stored.dtype} tensor "
            f"{list(stored.shape)}; {METADATA_FILE} says it holds a {read.chunk.dtype} tensor {list(read.chunk.sizes)}")
    _apply(read, stored, targets, planner)
