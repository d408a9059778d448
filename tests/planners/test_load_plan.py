"""The load planner's plan is DCP's own: the whole-tensor short cut gives, read item for read item and
in the same order, what ``create_default_local_load_plan`` computes, whatever the stored chunks."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from dcp_forge.planners.load import whole_tensor_load_plan
from tests.support.strategies import tilings


@st.composite
def saved_values(draw) -> tuple[object, object]:
    """(destination value, its ``.metadata`` entry): whole tensors (also 0-d, empty, parameters),
    tensors stored in chunks (a resharded load), and non-tensor values."""
    kind = draw(st.sampled_from(["whole", "chunked", "bytes", "parameter"]))
    if kind == "bytes":
        return draw(st.sampled_from([1, "x", None])), BytesStorageMetadata()
    if kind == "chunked":
        shape, boxes = draw(tilings())
        boxes = [(o, s) for o, s in boxes if all(x >= 0 for x in o)]
    else:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        boxes = [((0,) * len(shape), shape)]
    value = torch.zeros(shape)
    if kind == "parameter":
        value = torch.nn.Parameter(value)
    chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
    return value, TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), chunks)


@settings(max_examples=150, deadline=None)
@given(st.lists(saved_values(), max_size=8), st.sets(st.integers(0, 7)))
def test_whole_tensor_plan_is_dcps_plan(values: list, unsaved: set[int]) -> None:
    state = {f"m.k{i}": value for i, (value, _) in enumerate(values)}
    metadata = Metadata({f"m.k{i}": md for i, (_, md) in enumerate(values) if i not in unsaved})
    ours = whole_tensor_load_plan(state, metadata, strict=False).items
    dcps = create_default_local_load_plan(state, metadata, strict=False).items
    assert ours == dcps
    # MetadataIndex leaves its chunk index out of ==: it is the hint a reader looks a chunk up by
    assert [(r.dest_index.index, r.storage_index.index) for r in ours] == [
        (r.dest_index.index, r.storage_index.index) for r in dcps]
