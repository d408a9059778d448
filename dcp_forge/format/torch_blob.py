"""The ``torch.save`` zip of one tensor, as DCP stores every tensor item: writing it fast, finding the
tensor's bytes inside it.

Writing: ``torch.save`` runs a CRC-32 over every byte it writes, on the writer thread's critical path. dcp_forge checks its data with the xxh3
checksums in ``index.parquet`` instead, and ``torch.load`` (hence DCP's own reader) never checks the
zip CRC, so ``save_tensor`` writes the same zip with the CRC fields left 0 — torch's own
``compute_crc32=False`` option, applied to this one writer instead of the process-wide setting.

Reading: to read a stored tensor straight into its destination, a reader needs the offset of the
tensor's data record inside the blob and proof that the blob holds exactly one plain tensor of the
expected dtype and shape, laid out contiguously (with the lazy conjugate / negative flags torch.save
records beside the bytes, if any). ``tensor_blob_layout`` gets both from the zip's central directory and a restricted unpickling of ``data.pkl`` that never builds a tensor and never
imports anything beyond the few names a tensor pickle uses. dcp_forge's writer runs the same parse
on each large blob's edges as it writes them (``layout_from_edges``) and records the offset in
``index.parquet``, so its own checkpoints are read without fetching and parsing the edges first.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import pickle
import struct
import sys
import types
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.serialization

from .._torch_compat import save_tensor_without_crc
from ..core.tensors import dtype_named

# --- writing -------------------------------------------------------------------------------------


class _FirstErrorOnly:
    """A stream that passes writes on until one fails, then swallows the rest.

    torch's zip writer finishes the archive in its C++ destructor; if the stream raised (disk full,
    read-only), that second round of writes fails too, the destructor throws, and the whole process
    aborts (SIGABRT, no Python exception). Swallowing writes after the first error keeps the writer's
    bookkeeping consistent; ``save_tensor`` raises the first error once torch has let go of it.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        if self.error is None:
            try:
                return self.stream.write(data)
            except BaseException as err:  # raised by save_tensor after the writer is gone
                self.error = err
        return memoryview(data).nbytes

    def flush(self) -> None:
        if self.error is None:
            self.stream.flush()


def save_tensor(tensor: torch.Tensor, stream: Any) -> None:
    """``torch.save(tensor, stream)`` without the CRC-32 pass (falls back to torch.save if torch's
    private writer entry points change). A failing ``stream`` raises its error (see _FirstErrorOnly)."""
    guarded = _FirstErrorOnly(stream)
    save_tensor_without_crc(tensor, guarded)
    if guarded.error is not None:
        raise guarded.error
    stream.flush()


# --- reading -------------------------------------------------------------------------------------

# A blob's records other than the tensor data are tiny (pickle ~160 B, a few version records); reading
# this much from each end normally finds the central directory and every header in two reads.
EDGE_BYTES = 4096
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class TensorBlobLayout:
    """Where a stored tensor's bytes are inside its blob, and what they are."""

    data_offset: int  # from the start of the blob
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    math_bits: str | None = None  # lazy-view flags over these bytes (core.tensors.math_bits)

    def __str__(self) -> str:
        flags = f" read through its {self.math_bits} flags" if self.math_bits else ""
        return f"a {self.dtype} tensor {list(self.shape)} at byte {self.data_offset}{flags}"


def describe_layout(layout: TensorBlobLayout | None) -> str:
    """For messages: what a blob holds where (None: a blob that is not one plain tensor)."""
    return "no plain tensor" if layout is None else str(layout)


class NotPlainTensor(ValueError):
    """The blob is not one plain, contiguous, little-endian tensor: read it the generic way."""


class _BlobFile:
    """A read-only file over bytes [0, length) of a blob, served by ``read_at(offset, size)``.

    ``zipfile`` seeks and reads a few small pieces; pieces already fetched are kept.
    """

    def __init__(self, read_at: Callable[[int, int], bytes], length: int) -> None:
        self._read_at = read_at
        self._length = length
        self._pos = 0
        self._pieces: dict[int, bytes] = {}

    @property
    def length(self) -> int:
        return self._length

    def fetch(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self._length - offset))
        for start, data in self._pieces.items():
            if start <= offset and offset + size <= start + len(data):
                return data[offset - start:offset - start + size]
        data = self._read_at(offset, size)
        self._pieces[offset] = data
        return data

    # file protocol used by zipfile
    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._length - self._pos
        data = self.fetch(self._pos, size)
        self._pos += len(data)
        return data

    def seekable(self) -> bool:
        return True


@dataclass(frozen=True)
class _StorageRef:
    dtype: torch.dtype | None  # None: an untyped storage (``numel`` counts bytes), as _rebuild_tensor_v3 takes
    key: str
    numel: int


# ``torch.storage.UntypedStorage`` in a tensor pickle: the storage of the dtypes torch pickles with
# ``_rebuild_tensor_v3`` (uint16-64, float8, complex32, bits...), whose dtype is an argument instead.
_UNTYPED_STORAGE = object()


@dataclass(frozen=True)
class _TensorRef:
    dtype: torch.dtype  # its storage's (an untyped storage gets the dtype _rebuild_tensor_v3 names)
    storage_key: str
    storage_numel: int  # in elements of ``dtype``
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    math_bits: str | None = None


def _math_bits_of(metadata: Any) -> str | None:
    """The lazy-view flags torch.save records in a tensor's ``metadata`` (``{"conj": True, "neg": True}``)."""
    if not metadata:
        return None
    if not isinstance(metadata, dict) or set(metadata) - {"conj", "neg"} or not all(
            type(v) is bool for v in metadata.values()):
        raise NotPlainTensor(f"tensor with metadata {metadata!r}")
    return "+".join(name for name in ("conj", "neg") if metadata.get(name)) or None


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> _TensorRef:
    if not isinstance(storage, _StorageRef) or storage.dtype is None or backward_hooks:
        raise NotPlainTensor("tensor with hooks or without a typed storage")
    return _TensorRef(storage.dtype, storage.key, storage.numel, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride),
                      _math_bits_of(metadata))


def _rebuild_tensor_v3(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> _TensorRef:
    if not isinstance(storage, _StorageRef) or storage.dtype is not None or backward_hooks:
        raise NotPlainTensor("tensor with hooks or without an untyped storage")
    if not isinstance(dtype, torch.dtype) or dtype.itemsize < 1 or storage.numel % dtype.itemsize:
        raise NotPlainTensor(f"{dtype!r} does not divide a storage of {storage.numel} bytes")
    typed = _StorageRef(dtype, storage.key, storage.numel // dtype.itemsize)
    return _rebuild_tensor_v2(typed, storage_offset, size, stride, metadata=metadata)


class _LayoutUnpickler(pickle.Unpickler):
    """Reads a tensor pickle's description (storage dtype/key/numel, offset, size, stride) only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):
            return _rebuild_tensor_v3
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _UNTYPED_STORAGE
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _storage_dtypes():
            return _storage_dtypes()[name]
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # _rebuild_tensor_v3's dtype argument
        raise NotPlainTensor(f"{module}.{name} is not part of a plain tensor pickle")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and (isinstance(pid[1], torch.dtype) or pid[1] is _UNTYPED_STORAGE)):
            raise NotPlainTensor(f"unexpected persistent id {pid!r}")
        return _StorageRef(pid[1] if isinstance(pid[1], torch.dtype) else None, str(pid[2]), int(pid[4]))


@functools.cache
def _storage_dtypes() -> Mapping[str, torch.dtype]:
    """``{"FloatStorage": torch.float32, ...}``: the legacy storage classes tensor pickles name."""
    out = {}
    with warnings.catch_warnings():  # touching the legacy TypedStorage classes warns
        warnings.simplefilter("ignore")
        for name in dir(torch):
            if name.endswith("Storage"):
                dtype = getattr(getattr(torch, name, None), "dtype", None)
                if isinstance(dtype, torch.dtype):
                    out[name] = dtype
    return types.MappingProxyType(out)


def legacy_storage_name(dtype: torch.dtype) -> str | None:
    """The legacy storage class ``torch.save`` names for ``dtype`` (``"FloatStorage"``), None for the
    dtypes it pickles with ``_rebuild_tensor_v3`` instead."""
    return _legacy_storage_names().get(dtype)


@functools.cache
def _legacy_storage_names() -> Mapping[torch.dtype, str]:
    # "Storage" is an alias of FloatStorage; quantized storages (Q...) hold no plain tensor.
    return types.MappingProxyType({dtype: name for name, dtype in _storage_dtypes().items()
                                   if name != "Storage" and not name.startswith("Q")})


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _row_major(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether elements lie in row-major order without gaps, as torch's is_contiguous decides: the
    stride of a dimension of size 1 never moves to another element, so any value is contiguous there."""
    if len(shape) != len(stride):
        return False
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _stored_bytes(blob: _BlobFile, info: zipfile.ZipInfo) -> tuple[int, int]:
    """(offset, size) of a STORED zip member's bytes inside the blob."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise NotPlainTensor(f"{info.filename} is compressed")
    header = blob.fetch(info.header_offset, _LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        raise NotPlainTensor("truncated local header")
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_MAGIC:
        raise NotPlainTensor(f"no local header for {info.filename}")
    name_len, extra_len = fields[9], fields[10]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len, info.file_size


def tensor_blob_layout(blob: _BlobFile) -> TensorBlobLayout:
    """Parse a torch.save blob of one tensor; raises NotPlainTensor for anything else."""
    try:
        archive = zipfile.ZipFile(blob)  # reads only the end records and the central directory
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as err:
        raise NotPlainTensor(f"not a zip: {err}") from err
    by_suffix = {}
    for info in archive.infolist():
        prefix, _, rest = info.filename.partition("/")
        by_suffix[rest] = info
    pkl = by_suffix.get("data.pkl")
    if pkl is None:
        raise NotPlainTensor("no data.pkl record")
    order = by_suffix.get("byteorder")  # torch.load reads a blob without one as little endian
    if order is None:
        stored_order = b"little"
    else:
        order_offset, order_size = _stored_bytes(blob, order)
        stored_order = blob.fetch(order_offset, order_size)
    if stored_order != sys.byteorder.encode():
        raise NotPlainTensor("stored in another byte order")
    pkl_offset, pkl_size = _stored_bytes(blob, pkl)
    pickled = blob.fetch(pkl_offset, pkl_size)
    try:
        ref = _LayoutUnpickler(io.BytesIO(pickled)).load()
    except NotPlainTensor:
        raise
    except Exception as err:  # any malformed pickle: the generic path reports it properly
        raise NotPlainTensor(f"unreadable pickle: {err}") from err
    if not isinstance(ref, _TensorRef):
        raise NotPlainTensor(f"the blob holds a {type(ref).__name__}, not one tensor")
    numel = math.prod(ref.size)
    if ref.storage_offset != 0 or ref.storage_numel != numel or (
            numel > 1 and not _row_major(ref.size, ref.stride)):
        raise NotPlainTensor("the tensor is a strided view of its storage")
    data = by_suffix.get(f"data/{ref.storage_key}")
    if data is None:
        raise NotPlainTensor(f"no data record for storage {ref.storage_key!r}")
    data_offset, data_size = _stored_bytes(blob, data)
    nbytes = numel * ref.dtype.itemsize
    if data_size != nbytes or data_offset + nbytes > blob.length:
        raise NotPlainTensor(f"data record holds {data_size} bytes, the tensor needs {nbytes}")
    return TensorBlobLayout(data_offset, nbytes, ref.dtype, ref.size, ref.math_bits)


def layout_from_edges(head: bytes | bytearray, tail: bytes | bytearray, length: int) -> TensorBlobLayout | None:
    """The layout of a blob of ``length`` bytes from its first bytes (``head``) and last bytes
    (``tail``) alone, as a writer sees them stream past or a reader that read them; None when the
    blob is not one plain tensor or a record the parse needs lies outside both edges."""
    tail_start = length - len(tail)

    def read_at(offset: int, size: int) -> bytes:
        if offset + size <= len(head):
            return bytes(head[offset:offset + size])
        if offset >= tail_start:
            return bytes(tail[offset - tail_start:offset - tail_start + size])
        raise NotPlainTensor("a record lies between the edges given")

    try:
        return tensor_blob_layout(_BlobFile(read_at, length))
    except NotPlainTensor:
        return None


class BlobEdges:
    """The first and last ``size`` bytes of a blob, kept as its bytes stream past in pieces of any
    size (a writer's writes, a verifier's reads): what ``layout_from_edges`` needs."""

    def __init__(self, size: int = 64 * 1024) -> None:
        self.size = size
        self._head = bytearray()
        self._tail = bytearray()

    def clear(self) -> None:
        self._head.clear()
        self._tail.clear()

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if len(self._head) < self.size:
            self._head += view[:self.size - len(self._head)]
        self._tail += view[-self.size:]
        if len(self._tail) > 2 * self.size:  # trimmed now and then: amortised O(1) per byte
            del self._tail[:-self.size]

    def layout(self, length: int) -> TensorBlobLayout | None:
        """The layout of the ``length``-byte blob that streamed past (None: not one plain tensor)."""
        return layout_from_edges(self._head, self._tail[-self.size:], length)


def recorded_layout(data_offset: int | None, dtype: str | None, shape: tuple[int, ...] | None,
                    length: int, math_bits: str | None = None) -> TensorBlobLayout | None:
    """The layout an index row records for a stored item of ``length`` bytes (``dtype`` as in
    ``"torch.float32"``, ``shape`` the stored box, ``math_bits`` its lazy-view flags); None where the
    row records none, or one the item cannot hold."""
    if data_offset is None or dtype is None or shape is None:
        return None
    # Thousands of small tensors share a few layouts (an item's length only bounds it): one per shape.
    layout = (_layout(data_offset, dtype, shape, math_bits) if type(shape) is tuple and type(dtype) is str
              else _layout.__wrapped__(data_offset, dtype, shape, math_bits))
    if layout is None or layout.data_offset + layout.nbytes > length:
        return None
    return layout


@functools.lru_cache(maxsize=4096)
def _layout(data_offset: int, dtype: str, shape: tuple[int, ...], math_bits: str | None) -> TensorBlobLayout | None:
    """``recorded_layout`` before its bounds check against the item's length."""
    if any(s < 0 for s in shape):
        return None
    torch_dtype = dtype_named(dtype)
    if torch_dtype is None or data_offset < 0:
        return None
    return TensorBlobLayout(data_offset, math.prod(shape) * torch_dtype.itemsize, torch_dtype, tuple(shape), math_bits)


def open_blob(read_at: Callable[[int, int], bytes], length: int) -> _BlobFile:
    """A blob of ``length`` bytes read through ``read_at``, with both ends prefetched."""
    blob = _BlobFile(read_at, length)
    if length <= 2 * EDGE_BYTES:
        blob.fetch(0, length)
    else:
        blob.fetch(0, EDGE_BYTES)
        blob.fetch(length - EDGE_BYTES, EDGE_BYTES)
    return blob

