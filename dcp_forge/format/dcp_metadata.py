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


class _Shared:
    """One object per distinct value, for the parts of one metadata."""

    def __init__(self) -> None:
        self._sizes: dict[tuple[int, ...], torch.Size] = {}
        self._properties: dict[tuple, Any] = {}
        self._texts: dict[str, str] = {}

    def size(self, value: Any) -> Any:
        if type(value) is not torch.Size:  # a plain tuple stays a tuple: only torch.Size is shared
            return value
        return self._sizes.setdefault(tuple(value), value)

    def properties(self, value: Any) -> Any:
        # Every field with its type: equal-but-different values (1 and True) must not merge.
        fields = tuple((type(v), v) for v in vars(value).values())
        return self._properties.setdefault((type(value), *fields), value)

    def text(self, value: Any) -> Any:
        return self._texts.setdefault(value, value) if type(value) is str else value


def share_equal_parts(metadata: Metadata) -> None:
    """Make equal parts of ``metadata`` one object each (module docstring), in place. Only the
    containers of ``metadata`` are replaced or updated; every value stays equal and of its type."""
    shared = _Shared()
    keys: dict[str, str] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        keys[fqn] = fqn
        if isinstance(md, TensorStorageMetadata):
            md.properties = shared.properties(md.properties)
            md.size = shared.size(md.size)
            for chunk in md.chunks:
                chunk.offsets = shared.size(chunk.offsets)
                chunk.sizes = shared.size(chunk.sizes)
    if isinstance(metadata.planner_data, dict):
        metadata.planner_data = {keys.get(k, k) if type(k) is str else k: path
                                 for k, path in metadata.planner_data.items()}
    if isinstance(metadata.storage_data, dict):
        storage_data = {}
        for index, info in metadata.storage_data.items():
            if type(index) is MetadataIndex:
                index = _shared_index(index, keys.get(index.fqn, index.fqn), shared.size(index.offset))
            if hasattr(info, "relative_path"):
                info.relative_path = shared.text(info.relative_path)
            storage_data[index] = info
        metadata.storage_data = storage_data


def _shared_index(index: MetadataIndex, fqn: str, offset: Any) -> MetadataIndex:
    """``index`` naming ``fqn`` and ``offset`` themselves (equal to its own): its ``__init__`` would
    copy the offset into a new ``torch.Size``, so the fields are set as that ``__init__`` sets them."""
    if index.fqn is fqn and index.offset is offset:
        return index
    shared = MetadataIndex(fqn, None, index.index)
    object.__setattr__(shared, "offset", offset)
    return shared
