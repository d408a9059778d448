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
quicker to write and read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata


def share_equal_parts(metadata: Metadata) -> None:
    """Make equal parts of ``metadata`` one object each (module docstring), in place. Only the
    containers of ``metadata`` are replaced or updated; every value stays equal and of its type."""
    sizes: dict[tuple[int, ...], torch.Size] = {}
    properties: dict[tuple, Any] = {}

    def shared_size(value: Any) -> Any:
        if type(value) is not torch.Size:  # a plain tuple stays a tuple: only torch.Size is shared
            return value
        return sizes.setdefault(value, value)  # a Size hashes and compares as its tuple

    keys: dict[str, str] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        keys[fqn] = fqn
        if type(md) is not TensorStorageMetadata:
            continue
        try:
            md.properties = properties.setdefault(_properties_key(md.properties), md.properties)
        except TypeError:  # a field that cannot be a key: this one stays as it is
            pass
        md.size = shared_size(md.size)
        for chunk in md.chunks:
            chunk.offsets = shared_size(chunk.offsets)
            chunk.sizes = shared_size(chunk.sizes)
    if type(metadata.planner_data) is dict:
        metadata.planner_data = {keys.get(k, k) if type(k) is str else k: path
                                 for k, path in metadata.planner_data.items()}
    if type(metadata.storage_data) is dict:
        texts: dict[str, str] = {}
        storage_data = {}
        for index, info in metadata.storage_data.items():
            if type(index) is MetadataIndex:
                index = _shared_index(index, keys.get(index.fqn, index.fqn), shared_size(index.offset))
            path = getattr(info, "relative_path", None)
            if type(path) is str:
                info.relative_path = texts.setdefault(path, path)
            storage_data[index] = info
        metadata.storage_data = storage_data


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
