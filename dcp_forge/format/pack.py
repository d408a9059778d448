"""Packs: many small stored items in one run of zip records, each item still a complete ``torch.save``
zip that plain DCP reads.

A ``torch.save`` zip per item costs about 1.5 KB of records (seven aligned records and a central
directory) and a pass of torch's zip writer: for tiny tensors (norms, biases, optimizer steps) and
small values that is most of the checkpoint and of the time it takes. DCP reads an item by
``torch.load``-ing the byte range its ``.metadata`` records, so each item's range must still be a zip
that loads to its value. Zip readers find records through the central directory at the end of the
range and never look at bytes no entry names, so the ranges of a pack's items may overlap::

    pack:    [head 1][head 2] ... [head n][trailer 1][trailer 2] ... [trailer n]
    item i:          ^ head i .............................. end of trailer i ^

- the head of a tensor is the local header of record ``a/data/0`` and the tensor's bytes (contiguous,
  little endian, nothing in between); the head of another value is the local header of ``a/data.pkl``
  and the value's pickle, as ``torch.save`` wrote it;
- trailer 1 starts with the pack's one ``a/version`` record (torch's zip reader requires one; a
  missing ``byteorder`` record means little endian to ``torch.load``);
- a tensor's ``a/data.pkl`` is a pickle of ``_rebuild_tensor_v2`` (``_v3`` for dtypes without a
  legacy storage class) over storage ``0`` with the tensor's dtype and contiguous shape. It depends on
  nothing else, so the pack holds one per dtype and shape: in the trailer of the first tensor of that
  dtype and shape; the trailers of the others name that record (which lies in their gap);
- then every trailer has its central directory (``a/version``, ``a/data.pkl`` and, for a tensor,
  ``a/data/0``), offsets counted from the start of its item's head, and the end record.

An item owns its head and its trailer; the bytes between them (its *gap*: the heads and trailers of
other items of the pack) belong to other items. ``index.parquet`` records each packed item's gap,
and its checksum covers the item's own bytes in file order (head, then trailer), so every byte of a
pack is covered by exactly one item's checksum. Every field of a head and a trailer follows from
the item's dtype and shape (or pickle length) and where its gap and the version record are:
``records_problem`` rebuilds them and compares, which proves that what plain DCP would read from the
zip records is what the index says (dtype, shape, data offset), without parsing the zip. The records
an item names in its gap (the version record, a shared ``data.pkl``) are another item's bytes,
covered by that item's checksum; ``shared_records_problem`` checks them where the pack is at hand.
"""

from __future__ import annotations

import ctypes
import functools
import io
import math
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import xxhash

from .index import own_pieces
from .torch_blob import legacy_storage_name

# Items up to SMALL_ITEM_BYTES go into packs that close at PACK_BYTES: read whole, a pack at a time.
# Larger tensors go into large packs that close at LARGE_PACK_BYTES: each read straight into its
# destination, the trailers of a large pack in one read. Every range stays below the 4 GiB of a zip
# without zip64 records: tensors from PACKED_TENSOR_MAX_BYTES on keep a torch.save zip of their own.
SMALL_ITEM_BYTES = 64 * 1024
PACK_BYTES = 256 * 1024
LARGE_PACK_BYTES = 1024**3
PACKED_TENSOR_MAX_BYTES = 2**31 - 1

_LOCAL = struct.Struct("<4s5H3L2H")  # zip local file header
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # zip central directory entry
_END = struct.Struct("<4s4H2LH")  # zip end of central directory record
_ARCHIVE = b"a/"
_DATA_NAME = _ARCHIVE + b"data/0"
_PICKLE_NAME = _ARCHIVE + b"data.pkl"
_VERSION_NAME = _ARCHIVE + b"version"
_VERSION = b"3\n"  # the zip format version torch.save writes


def _local_header(name: bytes, size: int) -> bytes:
    """A STORED record's local header, sizes given (no data descriptor), CRC 0 (see torch_blob.py)."""
    return _LOCAL.pack(b"PK\x03\x04", 0, 0, 0, 0, 0, 0, size, size, len(name), 0) + name


def _central_entry(name: bytes, size: int, header_at: int) -> bytes:
    return _CENTRAL.pack(b"PK\x01\x02", 0, 0, 0, 0, 0, 0, 0, size, size, len(name), 0, 0, 0, 0, 0, header_at) + name


# Where a packed tensor's bytes start inside its item: right after its data record's local header.
DATA_OFFSET = _LOCAL.size + len(_DATA_NAME)
# Where a packed value's pickle starts inside its item: right after its data.pkl record's local header.
VALUE_OFFSET = _LOCAL.size + len(_PICKLE_NAME)
_VERSION_RECORD = _local_header(_VERSION_NAME, len(_VERSION)) + _VERSION
_MAX_INT = 2**31 - 1  # BININT's range: shapes beyond it are not packed


def _pickled_int(value: int) -> bytes:
    if value < 256:
        return b"K" + bytes([value])
    if value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _pickled_ints(values: Sequence[int]) -> bytes:
    body = b"".join(_pickled_int(v) for v in values)
    return {0: b")", 1: body + b"\x85", 2: body + b"\x86", 3: body + b"\x87"}.get(len(values), b"(" + body + b"t")


def _text(value: bytes) -> bytes:
    return b"X" + struct.pack("<I", len(value)) + value


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


@functools.lru_cache(maxsize=4096)
def tensor_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``data.pkl`` of a contiguous ``dtype`` tensor of ``shape`` stored as storage ``0``: what
    ``torch.save`` pickles, with nothing memoised and no backward hooks (None), in the opcodes the
    weights-only unpickler (DCP's ``torch.load``) reads."""
    numel = math.prod(shape)
    legacy = legacy_storage_name(dtype)
    module, _, name = str(dtype).partition(".")
    if legacy is not None:  # torch.save's own choice: v2 for dtypes with a legacy storage class
        rebuild, storage, count, dtype_arg = b"_rebuild_tensor_v2", b"torch\n" + legacy.encode(), numel, b""
    else:
        rebuild, storage, count = b"_rebuild_tensor_v3", b"torch.storage\nUntypedStorage", numel * dtype.itemsize
        dtype_arg = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return (b"\x80\x02ctorch._utils\n" + rebuild + b"\n((" + _text(b"storage") + b"c" + storage + b"\n" + _text(b"0")
            + _text(b"cpu") + _pickled_int(count) + b"tQK\x00" + _pickled_ints(shape)
            + _pickled_ints(_contiguous_strides(shape)) + b"\x89N" + dtype_arg + b"tR.")


def packable_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is stored packed: a small dense CPU tensor without lazy-view flags, of a dtype
    whose bytes ``torch.load`` reads back as they are, on a little-endian machine."""
    # Every size of a tensor holding an element is at most its element count, itself at most its
    # bytes: only an empty tensor's sizes need looking at (asked per item, so asked cheaply).
    return (type(tensor) is torch.Tensor and tensor.layout == torch.strided and tensor.is_cpu
            and not tensor.is_quantized and not tensor.is_conj() and not tensor.is_neg()
            and tensor.element_size() >= 1 and tensor.nbytes <= PACKED_TENSOR_MAX_BYTES
            and (tensor.numel() > 0 or max(tensor.shape, default=0) <= _MAX_INT) and sys.byteorder == "little")


_TORCH_SAVE_HOUSEKEEPING = frozenset({b".format_version", b".storage_alignment", b"byteorder", b"version",
                                      b".data/version", b".data/serialization_id"})


def value_pickle(zipped: Any) -> memoryview | None:
    """The pickle inside ``torch.save`` output of a value holding no tensor storage (``zipped``,
    bytes-like), if it can be packed: a small little-endian save whose only records besides
    ``data.pkl`` are torch's housekeeping records (no storage); None otherwise (stored as its own zip).

    Read through the central directory, as zip readers do (torch's writer puts the sizes after each
    record's data, not in its local header)."""
    view = memoryview(zipped).cast("B")
    if not _END.size <= len(view) <= SMALL_ITEM_BYTES or sys.byteorder != "little":
        return None
    signature, _, _, _, count, directory_size, directory, comment = _END.unpack_from(view, len(view) - _END.size)
    if signature != b"PK\x05\x06" or comment or directory + directory_size > len(view) - _END.size:
        return None
    found, at = None, directory
    for _ in range(count):
        if at + _CENTRAL.size > len(view):
            return None
        fields = _CENTRAL.unpack_from(view, at)
        method, size, name_len, extra_len, comment_len, header_at = fields[4], fields[9], fields[10], fields[11], \
            fields[12], fields[16]
        record = bytes(view[at + _CENTRAL.size:at + _CENTRAL.size + name_len]).partition(b"/")[2]
        at += _CENTRAL.size + name_len + extra_len + comment_len
        if method != 0 or (record != b"data.pkl" and record not in _TORCH_SAVE_HOUSEKEEPING):
            return None  # compressed, or a storage record: the value holds tensors
        if record == b"data.pkl":
            if header_at + _LOCAL.size > len(view):
                return None
            local = _LOCAL.unpack_from(view, header_at)
            start = header_at + _LOCAL.size + local[9] + local[10]
            if local[0] != b"PK\x03\x04" or start + size > len(view):
                return None
            found = view[start:start + size]
    return found


class PackedItem(NamedTuple):
    """One item of a pack: its range (what DCP reads), from the pack's first byte, its gap, and the
    checksum of the bytes it owns. (A tuple: a pack makes one per item.)"""

    offset: int
    length: int
    gap_offset: int  # from ``offset``: where the bytes of other items start
    gap_length: int
    data_offset: int | None  # a tensor's: where its bytes start, from ``offset``
    checksum: str  # xxh3_64 hex of its head, then its trailer

    @property
    def own_pieces(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return own_pieces(self.length, self.gap_offset, self.gap_length)


@functools.lru_cache(maxsize=4096)
def _tensor_records(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """A packed tensor's ``data.pkl`` record (local header and pickle) and the central directory
    entry of its data record (always at the item's start)."""
    pickled = tensor_pickle(dtype, shape)
    return (_local_header(_PICKLE_NAME, len(pickled)) + pickled,
            _central_entry(_DATA_NAME, math.prod(shape) * dtype.itemsize, 0))


def _trailer(tensor: tuple[torch.dtype, tuple[int, ...]] | None, value_bytes: int, trailer_at: int,
             version_at: int, pickle_at: int | None = None) -> bytes:
    """An item's trailer: ``tensor`` (dtype, shape) or a value pickle of ``value_bytes``; offsets from
    the item's start: its trailer at ``trailer_at``, the pack's version record at ``version_at``, and a
    tensor's ``data.pkl`` record at ``pickle_at`` (None: in this trailer, after the version record if
    the trailer carries it)."""
    version = _central_entry(_VERSION_NAME, len(_VERSION), version_at)
    first = _VERSION_RECORD if version_at == trailer_at else b""  # the pack's first trailer carries it
    at = trailer_at + len(first)
    if tensor is not None:
        pickle_record, data_entry = _tensor_records(*tensor)
        pickle_bytes = len(pickle_record) - VALUE_OFFSET
        if pickle_at is None or pickle_at == at:
            pickle_at = at
            at += len(pickle_record)
        else:  # another trailer's record of this dtype and shape
            pickle_record = b""
        entries = version + _central_entry(_PICKLE_NAME, pickle_bytes, pickle_at) + data_entry
        count = 3
    else:
        pickle_record = b""
        entries = version + _central_entry(_PICKLE_NAME, value_bytes, 0)
        count = 2
    return first + pickle_record + entries + _END.pack(b"PK\x05\x06", 0, 0, count, count, len(entries), at, 0)


def _memory(tensor: torch.Tensor) -> Any:
    """The bytes of a contiguous CPU tensor, without a copy (a ctypes array over its memory)."""
    return (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())


class PackWriter:
    """Writes one pack to ``out`` (anything with ``write``) as items come: each item's head at once,
    the trailers when it is closed (``close`` returns the items, in the order they came).

    Heads of small items are gathered and written together; a large tensor's bytes are written
    straight from its memory. Each item's checksum is computed as its bytes are written.
    """

    _GATHER = 1024 * 1024

    def __init__(self, out: Any) -> None:
        self._out = out
        self._pending = bytearray()
        # (start, (dtype, shape) or None for a value, payload bytes, hasher of what is written so far)
        self._entries: list[tuple[int, tuple[torch.dtype, tuple[int, ...]] | None, int, Any]] = []
        self.size = 0  # bytes of heads so far (the pack's span, without its trailers)

    def __len__(self) -> int:
        return len(self._entries)

    def add_tensor(self, tensor: torch.Tensor) -> None:
        """Add a tensor ``packable_tensor`` accepts; it must not change until it is written."""
        tensor = tensor.contiguous()
        nbytes = tensor.nbytes
        header = data_header(nbytes)
        small = nbytes <= SMALL_ITEM_BYTES
        # a small tensor's bytes copied at once (one call), a large one's viewed in place
        data = ctypes.string_at(tensor.data_ptr(), nbytes) if small else _memory(tensor)
        hasher = xxhash.xxh3_64(header)
        hasher.update(data)
        self._pending += header
        if small:
            self._pending += data
        else:  # written from the tensor's own memory, after what was gathered before it
            self._flush()
            self._out.write(memoryview(data).cast("B"))
        self._entries.append((self.size, (tensor.dtype, tuple(tensor.shape)), nbytes, hasher))
        self.size += DATA_OFFSET + nbytes
        if len(self._pending) >= self._GATHER:
            self._flush()

    def add_value(self, pickled: Any) -> None:
        """Add a value's pickle (``value_pickle``)."""
        header = _local_header(_PICKLE_NAME, len(pickled))
        hasher = xxhash.xxh3_64(header)
        hasher.update(pickled)
        self._pending += header
        self._pending += pickled
        self._entries.append((self.size, None, len(pickled), hasher))
        self.size += VALUE_OFFSET + len(pickled)
        if len(self._pending) >= self._GATHER:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._out.write(self._pending)
            self._pending = bytearray()

    def close(self) -> list[PackedItem]:
        """Write the trailers; the items of the pack, each with its range, gap and checksum."""
        version_at = at = self.size
        items = []
        trailers = []
        pickles: dict[tuple[torch.dtype, tuple[int, ...]], int] = {}  # where each data.pkl record is
        for start, described, nbytes, hasher in self._entries:
            pickle_at = None
            if described is not None:
                # the first trailer of a dtype and shape carries its record, after the version record
                pickle_at = pickles.setdefault(described, at + (len(_VERSION_RECORD) if at == version_at else 0)) - start
            trailer = _trailer(described, nbytes, at - start, version_at - start, pickle_at)
            hasher.update(trailer)
            head = (DATA_OFFSET if described is not None else VALUE_OFFSET) + nbytes
            items.append(PackedItem(start, at + len(trailer) - start, head, at - start - head,
                                    DATA_OFFSET if described is not None else None, hasher.hexdigest()))
            trailers.append(trailer)
            at += len(trailer)
        self._pending += b"".join(trailers)
        self._flush()
        self._entries = []
        return items


def pack_in_memory(entries: Sequence[torch.Tensor | Any]) -> tuple[bytes, list[PackedItem]]:
    """One pack of ``entries`` (tensors, or value pickles) in memory: what a writer would store."""
    out = io.BytesIO()
    writer = PackWriter(out)
    for entry in entries:
        if isinstance(entry, torch.Tensor):
            writer.add_tensor(entry)
        else:
            writer.add_value(entry)
    items = writer.close()
    return out.getvalue(), items


@functools.lru_cache(maxsize=4096)
def data_header(nbytes: int) -> bytes:
    """The local header in front of a packed tensor of ``nbytes`` (the first ``DATA_OFFSET`` bytes of
    its item): a reader that reads the tensor straight into place knows it without reading it."""
    return _local_header(_DATA_NAME, nbytes)


def records_problem(head: Any, trailer: Any, trailer_at: int, tensor: tuple[torch.dtype, tuple[int, ...]] | None
                    ) -> str | None:
    """Why the ``head`` and ``trailer`` bytes of a packed item (its trailer at ``trailer_at`` from its
    start) are not the zip records of a ``tensor`` (dtype, shape) at ``DATA_OFFSET``, or of a value
    pickle filling the rest of the head; None when they are exactly that."""
    head = memoryview(head).cast("B")
    if tensor is not None:
        dtype, shape = tensor
        nbytes = math.prod(shape) * dtype.itemsize
        if len(head) != DATA_OFFSET + nbytes or head[:DATA_OFFSET] != data_header(nbytes):
            return f"its head is not the data record of a {dtype} tensor {list(shape)}"
        return trailer_problem(trailer, trailer_at, tensor)
    value_bytes = len(head) - VALUE_OFFSET
    if value_bytes < 0 or head[:VALUE_OFFSET] != _local_header(_PICKLE_NAME, value_bytes):
        return "its head is not the record of a pickled value"
    return trailer_problem(trailer, trailer_at, None, value_bytes)


def trailer_problem(trailer: Any, trailer_at: int, tensor: tuple[torch.dtype, tuple[int, ...]] | None,
                    value_bytes: int = 0) -> str | None:
    """Why ``trailer`` (at ``trailer_at`` from its item's start) is not the trailer of a packed
    ``tensor`` (dtype, shape), or of a value pickle of ``value_bytes``; None when it is exactly that.
    A ``data.pkl`` record it names outside itself must lie in its gap (``shared_records_problem``
    checks what is there)."""
    trailer = memoryview(trailer).cast("B")
    found = _named_records(trailer, trailer_at)
    if found is None:
        return "its end record points outside its trailer"
    version_at, shared_at = found
    pickle_at = None  # in the trailer, where ``_trailer`` puts it: compared below with the rest
    if tensor is not None and shared_at < trailer_at:
        dtype, shape = tensor
        head_end = DATA_OFFSET + math.prod(shape) * dtype.itemsize
        if not head_end <= shared_at <= trailer_at - len(_tensor_records(dtype, shape)[0]):
            return f"its central directory names a data.pkl record at byte {shared_at}, outside its gap"
        pickle_at = shared_at
    if trailer != _trailer(tensor, value_bytes, trailer_at, version_at, pickle_at):
        what = f"a {tensor[0]} tensor {list(tensor[1])}" if tensor is not None else "a pickled value"
        return f"its zip trailer is not the one of {what} (plain DCP would read something else)"
    return None


def _named_records(trailer: memoryview, trailer_at: int) -> tuple[int, int] | None:
    """Where a packed item's central directory says the version record and the ``data.pkl`` record
    are (from the item's start): its first two entries; None when its end record points outside
    ``trailer``."""
    if len(trailer) < _END.size + 2 * _CENTRAL.size:
        return None
    directory = _END.unpack_from(trailer, len(trailer) - _END.size)[6] - trailer_at
    if not 0 <= directory <= len(trailer) - _END.size - 2 * _CENTRAL.size:
        return None
    version = _CENTRAL.unpack_from(trailer, directory)
    pickle_entry = directory + _CENTRAL.size + version[10]
    if pickle_entry + _CENTRAL.size > len(trailer):
        return None
    return version[16], _CENTRAL.unpack_from(trailer, pickle_entry)[16]


def shared_records_problem(trailer: Any, trailer_at: int, tensor: tuple[torch.dtype, tuple[int, ...]] | None,
                           read_at: Callable[[int, int], Any]) -> str | None:
    """Why the records a packed item's central directory names in its gap (the pack's version record;
    a tensor's ``data.pkl`` when another trailer carries it) are not what they must be; ``read_at(at,
    n)`` gives bytes of the item's range: a check for where the whole pack is at hand, as in
    ``verify``. The trailer itself must have passed ``trailer_problem``."""
    found = _named_records(memoryview(trailer).cast("B"), trailer_at)
    if found is None:
        return "its end record points outside its trailer"
    version_at, pickle_at = found
    if version_at < 0 or bytes(read_at(version_at, len(_VERSION_RECORD))) != _VERSION_RECORD:
        return f"its central directory names a version record at byte {version_at} where there is none"
    if tensor is not None and pickle_at < trailer_at:
        record = _tensor_records(*tensor)[0]
        if bytes(read_at(pickle_at, len(record))) != record:
            return (f"its central directory names the data.pkl record of a {tensor[0]} tensor {list(tensor[1])} "
                    f"at byte {pickle_at} where there is none")
    return None


def value_zip(head: Any) -> bytes:
    """A standalone ``torch.save`` zip of the pickled value in a packed value's ``head`` (what DCP's
    ``load_bytes`` expects), without the other items that share its range: the head, then a trailer
    that starts with a version record of its own."""
    head = bytes(head)
    return head + _trailer(None, len(head) - VALUE_OFFSET, len(head), len(head))
