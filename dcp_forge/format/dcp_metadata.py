"""DCP's ``.metadata`` as dcp_forge writes it: the same ``Metadata``, with equal parts shared.

``.metadata`` is DCP's ``Metadata`` pickled as it is, so that plain DCP reads it. Pickle writes an
object once and refers back to it wherever the *same* object appears again (its memo), but equal
objects that are distinct are written out each time. DCP's planning makes a fresh
``TensorProperties``, shape, offsets and index per item, so every item carries its own copies of
what most items share (one dtype, a few shapes, zero offsets, the data files' names), and the key
of each item is written apart from the name its index and flattening path use.

``share_equal_parts`` makes equal parts one object: each distinct ``TensorProperties``, each
distinct ``torch.Size``, each data file's name, and each key (the one ``state_dict_metadata`` uses,
in ``planner_data`` and in every ``MetadataIndex`` of ``storage_data``). Nothing changes value or
type, so the unpickled metadata is equal to the one written; only the pickle gets shorter and
quicker to write and read. A commit shares the tensors' parts first (``share_tensor_parts``) and
makes each ``storage_data`` entry of the shared parts as it builds it (``SharedParts.location``),
instead of rebuilding ``storage_data`` afterwards: the same objects, one pass fewer over the items.

``metadata_pickle`` then writes it with the chunk, tensor and location records rebuilt by their
constructors from their fields in order (pickle's ``REDUCE``), instead of an empty object and a dict
naming each field (``NEWOBJ`` and ``BUILD``): the same objects come back, without a field name per
field per item. ``MetadataIndex`` keeps its default record: its ``__init__`` builds a new
``torch.Size``, which would cost a load more than the names it saves. ``storage_data`` is written
first, so that what its items share (their classes, the data files' names) gets pickle's short memo
references (the first 256 objects written).
"""

from __future__ import annotations

import copyreg
import dataclasses
import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from .._torch_compat import StorageInfo


def share_equal_parts(metadata: Metadata) -> None:
    """Make equal parts of ``metadata`` one object each (module docstring), in place. Only the
    containers of ``metadata`` are replaced or updated; every value stays equal and of its type."""
    parts = share_tensor_parts(metadata)
    if type(metadata.storage_data) is dict:
        storage_data = {}
        for index, info in metadata.storage_data.items():
            path = getattr(info, "relative_path", None)
            if type(path) is str:
                info.relative_path = parts.texts.setdefault(path, path)
            storage_data[parts.index(index)] = info
        metadata.storage_data = storage_data


class SharedParts:
    """The one object of each equal part of a metadata (``share_tensor_parts``): what its
    ``storage_data`` shares, whether it is shared afterwards (``share_equal_parts``) or made shared
    (``location``)."""

    def __init__(self) -> None:
        self.sizes: dict[tuple[int, ...], torch.Size] = {}  # a Size hashes and compares as its tuple
        self.keys: dict[str, str] = {}  # each key of state_dict_metadata, as that dict holds it
        self.texts: dict[str, str] = {}  # the data files' names

    def size(self, value: Any) -> Any:
        if type(value) is not torch.Size:  # a plain tuple stays a tuple: only torch.Size is shared
            return value
        return self.sizes.setdefault(value, value)

    def index(self, index: Any) -> Any:
        """``index`` naming the shared key and offset (itself if it names them already)."""
        if type(index) is not MetadataIndex:
            return index
        return _shared_index(index, self.keys.get(index.fqn, index.fqn), self.size(index.offset))

    def location(self, index: MetadataIndex, path: str, offset: int, length: int) -> tuple[Any, StorageInfo]:
        """The ``storage_data`` entry of item ``index`` stored at ``offset`` of file ``path``, made
        of the shared parts as ``share_equal_parts`` would leave it."""
        return self.index(index), StorageInfo(self.texts.setdefault(path, path), offset, length)


def share_tensor_parts(metadata: Metadata) -> SharedParts:
    """``share_equal_parts`` for all but ``storage_data``: each tensor's properties and sizes, and the
    keys of ``planner_data``; returns the parts, which its ``storage_data`` is then made of."""
    parts = SharedParts()
    size, keys = parts.size, parts.keys
    properties: dict[tuple, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        keys[fqn] = fqn
        if type(md) is not TensorStorageMetadata:
            continue
        try:
            md.properties = properties.setdefault(_properties_key(md.properties), md.properties)
        except TypeError:  # a field that cannot be a key: this one stays as it is
            pass
        md.size = size(md.size)
        for chunk in md.chunks:
            chunk.offsets = size(chunk.offsets)
            chunk.sizes = size(chunk.sizes)
    if type(metadata.planner_data) is dict:
        metadata.planner_data = {keys.get(k, k) if type(k) is str else k: path
                                 for k, path in metadata.planner_data.items()}
    return parts


def _properties_key(value: Any) -> tuple:
    """What makes two ``TensorProperties`` interchangeable: their class and every field with its type
    (1 and True are equal, but not the same field)."""
    fields = tuple(vars(value).values())
    return (type(value), fields, tuple(map(type, fields)))


def _shared_index(index: MetadataIndex, fqn: str, offset: Any) -> MetadataIndex:
    """``index`` naming ``fqn`` and ``offset`` themselves (equal to its own). Its ``__init__`` would
    copy the offset into a new ``torch.Size``: the fields are set as that ``__init__`` sets them."""
    if index.fqn is fqn and index.offset is offset:
        return index
    shared = MetadataIndex.__new__(MetadataIndex)
    object.__setattr__(shared, "fqn", fqn)
    object.__setattr__(shared, "index", index.index)
    object.__setattr__(shared, "offset", offset)
    return shared


def metadata_pickle(metadata: Metadata) -> bytes:
    """``metadata`` pickled as ``pickle.dumps`` would, with shorter records (module docstring): what
    ``pickle.load`` (plain DCP's reader) gives back is equal to ``metadata``, field types included."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=4)
    pickler.dispatch_table = copyreg.dispatch_table.copy()
    pickler.dispatch_table.update(_COMPACT_REDUCERS)
    pickler.dump(metadata)
    return out.getvalue()


def _metadata_reduce(metadata: Metadata) -> Any:
    # Rebuilt as unpickling any dataclass is (an empty object given its fields), storage_data first.
    state = vars(metadata)
    order = sorted(state, key=lambda name: name != "storage_data")
    return copyreg.__newobj__, (Metadata,), {name: state[name] for name in order}  # type: ignore[attr-defined]


def _chunk_reduce(chunk: ChunkStorageMetadata) -> Any:
    return _as_fields(chunk, ChunkStorageMetadata, (chunk.offsets, chunk.sizes))


def _tensor_reduce(md: TensorStorageMetadata) -> Any:
    return _as_fields(md, TensorStorageMetadata, (md.properties, md.size, md.chunks))


def _storage_reduce(info: Any) -> Any:
    args: tuple = (info.relative_path, info.offset, info.length)
    descriptors = getattr(info, "transform_descriptors", None)
    if descriptors is not None:
        args += (descriptors,)
    return _as_fields(info, StorageInfo, args)


def _as_fields(value: Any, cls: type, args: tuple) -> Any:
    """``cls(*args)``, where ``value`` holds nothing beyond its fields; otherwise the default record,
    which keeps every attribute."""
    if not vars(value).keys() <= _FIELDS[cls]:
        return value.__reduce_ex__(4)
    return cls, args


_FIELDS: dict[type, frozenset[str]] = {
    cls: frozenset(f.name for f in dataclasses.fields(cls))
    for cls in (ChunkStorageMetadata, TensorStorageMetadata, StorageInfo)}
_COMPACT_REDUCERS: dict[type, Any] = {
    Metadata: _metadata_reduce,
    ChunkStorageMetadata: _chunk_reduce,
    TensorStorageMetadata: _tensor_reduce,
    StorageInfo: _storage_reduce,
}
