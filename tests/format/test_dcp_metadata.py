"""DCP's .metadata with equal parts shared and written with short records: it unpickles equal (plain
pickle, as DCP reads it, and the restricted loader), field types included, and shorter."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.planner_helpers import _create_write_items

from dcp_forge._torch_compat import StorageInfo
from dcp_forge.core.placement import ChunkPolicy, split_large_tensors
from dcp_forge.format.dcp_metadata import metadata_pickle, share_equal_parts, share_tensor_parts
from dcp_forge.format.safe_load import load_dcp_metadata

_values = st.one_of(
    st.builds(lambda shape, dtype, grad: torch.zeros(shape, dtype=dtype).requires_grad_(grad),
              st.lists(st.integers(0, 9), max_size=3), st.sampled_from([torch.float32, torch.bfloat16]), st.booleans()),
    st.integers(), st.text(max_size=3))


def _metadata(state: dict[str, object], files: list[str], chunk_bytes: int = 8) -> Metadata:
    """Metadata as DCP plans it (tensors from ``2 * chunk_bytes`` on cut into chunks as dcp_forge
    does), with locations."""
    items = [item for fqn, value in state.items() for item in _create_write_items(fqn, value)]
    plan = split_large_tensors(SavePlan(items), lambda fqn: 2, ChunkPolicy(min_chunk_bytes=chunk_bytes))
    _, metadata = create_default_global_save_plan([plan], rewrite_index_hints=False)
    metadata.planner_data = {fqn: ("model", fqn.split(".", 1)[-1]) for fqn in state}
    metadata.storage_data = {item.index: StorageInfo(str(files[i % len(files)]), 8 * i, 8)
                             for i, item in enumerate(plan.items)}
    return metadata


def _typed(value: object) -> object:
    """``value`` with the type of every part it holds, so that a tuple is not equal to a torch.Size."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), tuple((f.name, _typed(getattr(value, f.name))) for f in dataclasses.fields(value)))
    if isinstance(value, dict):
        return (type(value), tuple((_typed(k), _typed(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_typed(v) for v in value))
    return (type(value), value)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("ab.", min_size=1, max_size=6).map(lambda s: "model." + s), _values, max_size=8),
       st.lists(st.sampled_from(["__0_0.distcp", "__0_1.distcp", "__1_0.distcp"]), min_size=1, max_size=3))
def test_shared_metadata_unpickles_equal_with_the_same_types(state: dict[str, object], files: list[str]) -> None:
    original = _metadata(state, files)
    shared = copy.deepcopy(original)
    share_equal_parts(shared)
    written, compact = pickle.dumps(shared), metadata_pickle(shared)
    for data in (written, compact):
        for loaded in (pickle.loads(data), load_dcp_metadata(data, name="test")):
            assert loaded == original
            assert _typed(loaded) == _typed(original)
    assert len(compact) <= len(written) <= len(pickle.dumps(original))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("ab.", min_size=1, max_size=6).map(lambda s: "model." + s), _values, max_size=8),
       st.lists(st.sampled_from(["__0_0.distcp", "__0_1.distcp", "__1_0.distcp"]), min_size=1, max_size=3))
def test_locations_made_of_the_shared_parts_pickle_as_locations_shared_afterwards(state: dict[str, object],
                                                                                   files: list[str]) -> None:
    """How a commit builds storage_data (each entry made of the shared parts as it is built) writes the
    same bytes as sharing every part of the finished metadata."""
    afterwards = _metadata(state, files)
    for info in afterwards.storage_data.values():  # each name its own object, as the writers report them
        info.relative_path = "".join(info.relative_path)
    as_built = copy.deepcopy(afterwards)
    share_equal_parts(afterwards)
    parts = share_tensor_parts(as_built)
    entries = [parts.location(index, info.relative_path, info.offset, info.length)
               for index, info in as_built.storage_data.items()]
    as_built.storage_data = dict(entries)
    assert metadata_pickle(as_built) == metadata_pickle(afterwards)
    assert pickle.loads(metadata_pickle(as_built)) == pickle.loads(metadata_pickle(afterwards))


def test_equal_parts_are_written_once() -> None:
    state = {f"model.w{i}": torch.zeros(4) for i in range(50)}
    metadata = _metadata(state, ["__0_0.distcp"], chunk_bytes=1024)
    before = len(pickle.dumps(metadata))
    share_equal_parts(metadata)
    loaded = pickle.loads(pickle.dumps(metadata))
    tensors = list(loaded.state_dict_metadata.values())
    assert all(md.properties is tensors[0].properties and md.size is tensors[0].size for md in tensors)
    assert all(md.chunks[0].offsets is index.offset for md, index in zip(tensors, loaded.storage_data, strict=True))
    keys = list(loaded.state_dict_metadata)
    assert all(index.fqn is key for index, key in zip(loaded.storage_data, keys, strict=True))
    assert all(p is k for p, k in zip(loaded.planner_data, keys, strict=True))
    assert len({id(info.relative_path) for info in loaded.storage_data.values()}) == 1
    assert len(pickle.dumps(metadata)) < 0.8 * before


def test_a_tuple_offset_stays_a_tuple() -> None:
    index = MetadataIndex("model.x", (0,))
    metadata = Metadata(state_dict_metadata={}, storage_data={index: StorageInfo("f", 0, 1)})
    object.__setattr__(index, "offset", (0,))  # as an older writer may have left it
    share_equal_parts(metadata)
    assert type(next(iter(metadata.storage_data)).offset) is tuple
    assert type(next(iter(pickle.loads(metadata_pickle(metadata)).storage_data)).offset) is tuple


def test_short_records_keep_what_is_not_a_field_and_drop_a_field_name_per_item() -> None:
    state = {f"model.w{i}": torch.zeros(4) for i in range(50)}
    metadata = _metadata(state, ["__0_0.distcp"], chunk_bytes=1024)
    share_equal_parts(metadata)
    info = next(iter(metadata.storage_data.values()))
    info.note = "kept"  # an attribute beyond DCP's fields: written as pickle writes it
    info.transform_descriptors = ["zstd"]
    compact = metadata_pickle(metadata)
    loaded = pickle.loads(compact)
    first = next(iter(loaded.storage_data.values()))
    assert (first.note, first.transform_descriptors) == ("kept", ["zstd"]) and loaded == metadata
    assert compact.count(b"relative_path") == 1 and compact.count(b"offsets") == 0
    assert len(compact) < 0.75 * len(pickle.dumps(metadata))
