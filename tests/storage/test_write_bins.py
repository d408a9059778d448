"""How a rank's items are spread over its data files (writer._bins): largest first, each onto the
file with the fewest bytes so far (the first of them on a tie), items of one size in plan order."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from dcp_forge.core.placement import item_bytes
from dcp_forge.storage.writer import _bins


def _item(i: int, elements: int | None) -> WriteItem:
    if elements is None:
        return WriteItem(index=MetadataIndex(f"v{i}"), type=WriteItemType.BYTE_IO)
    size = torch.Size([elements])
    return WriteItem(index=MetadataIndex(f"t{i}", torch.Size([0])), type=WriteItemType.TENSOR, tensor_data=TensorWriteData(
        chunk=ChunkStorageMetadata(torch.Size([0]), size), properties=TensorProperties(dtype=torch.float32), size=size))


def _expected(items: list[WriteItem], count: int) -> list[list[WriteItem]]:
    bins: list[list[WriteItem]] = [[] for _ in range(count)]
    loads = [0] * count
    for position in sorted(range(len(items)), key=lambda p: (-item_bytes(items[p]), p)):
        lightest = min(range(count), key=lambda b: (loads[b], b))
        bins[lightest].append(items[position])
        loads[lightest] += item_bytes(items[position])
    return [b for b in bins if b]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from([1, 4, 256, 300]), st.integers(0, 5000)), max_size=40),
       st.integers(1, 4))
def test_items_go_largest_first_onto_the_lightest_file(sizes: list[int | None], count: int) -> None:
    items = [_item(i, n) for i, n in enumerate(sizes)]
    assert _bins(items, count) == _expected(items, count)
