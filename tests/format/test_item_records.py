"""The index columns and DCP locations a commit builds from its write results (manifest.py): the
columns of the records the metadata and each result make, in (fqn, chunk offsets) order whatever order
the writers reported in, and each result's location under its own index; and the manifest's sums over
each copy's items."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.storage import WriteResult

from dcp_forge._torch_compat import StorageInfo
from dcp_forge.core.components import ComponentLayout
from dcp_forge.core.keys import StorageKey, parse_storage_key
from dcp_forge.core.patterns import SharingPattern
from dcp_forge.core.topology import Topology
from dcp_forge.format.index import (
    ItemRecord,
    StoredItem,
    decode_index,
    encode_columns,
    encode_index,
    new_record,
    record_columns,
)
from dcp_forge.format.manifest import (
    combine_checksums,
    component_manifests,
    component_manifests_of,
    item_columns_and_locations,
)


def _saved(kinds: list[int]) -> tuple[Metadata, list[WriteResult]]:
    """A value per entry of ``kinds``: 0 bytes, 1 a whole tensor, n > 1 a tensor in n row-chunks."""
    entries, results = {}, []
    for i, chunks in enumerate(kinds):
        fqn = f"model.v{i % 7}.{i}"  # names share prefixes, so sorting compares more than their start
        if chunks == 0:
            entries[fqn] = BytesStorageMetadata()
            results.append(WriteResult(MetadataIndex(fqn), 10, StoredItem("__0_0.distcp", 10 * i, 10, f"{i:x}", 0)))
            continue
        boxes = [(torch.Size([row, 0]), torch.Size([1, 3])) for row in range(chunks)]
        entries[fqn] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([chunks, 3]),
                                             [ChunkStorageMetadata(o, s) for o, s in boxes])
        for row, (offsets, _) in enumerate(boxes):
            results.append(WriteResult(MetadataIndex(fqn, offsets), 12,
                                       StoredItem("__0_1.distcp", 100 * i + row, 12, f"{i}-{row}", 0)))
    return Metadata(state_dict_metadata=entries), results


def _location(index: MetadataIndex, path: str, offset: int, length: int) -> tuple[MetadataIndex, StorageInfo]:
    return index, StorageInfo(path, offset, length)


def _stored(i: int, row: int, data: st.DataObject) -> StoredItem:
    """What a writer reports for item ``i``'s ``row``: every optional field drawn."""
    maybe = lambda strategy: data.draw(st.one_of(st.none(), strategy))  # noqa: E731
    gap_offset = maybe(st.integers(0, 5))
    return StoredItem(data.draw(st.sampled_from(["__0_0.distcp", "__1_0.distcp"])), 100 * i + row, 12,
                      f"{i}-{row}", data.draw(st.integers(0, 3)), maybe(st.integers(0, 9)),
                      maybe(st.sampled_from(['["a", 1]', '[2]'])), maybe(st.sampled_from(["conj", "neg"])),
                      gap_offset, None if gap_offset is None else data.draw(st.integers(0, 5)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.randoms(use_true_random=False),
       st.integers(1, 3), st.data())
def test_columns_are_the_records_in_key_order_and_locations_under_their_own_index(
        kinds: list[int], rng: random.Random, ranks: int, data: st.DataObject) -> None:
    metadata, results = _saved(kinds)
    results = [WriteResult(r.index, r.size_in_bytes, _stored(i, int((r.index.offset or [0])[0]), data))
               for i, r in enumerate(results)]
    rng.shuffle(results)
    per_rank = [results[r::ranks] for r in range(ranks)]
    layouts = {"model": ComponentLayout("model", SharingPattern.REPLICATED)}
    columns, locations = item_columns_and_locations(metadata, per_rank, layouts, _location)
    assert locations == {res.index: StorageInfo(res.storage_data.relative_path, res.storage_data.offset,
                                                res.storage_data.length) for res in results}
    # Each record as its constructor builds it from the metadata and the result, field by field by name.
    expected = []
    for res in results:
        info, md = res.storage_data, metadata.state_dict_metadata[res.index.fqn]
        tensor = isinstance(md, TensorStorageMetadata)
        offsets = tuple(res.index.offset) if res.index.offset is not None else None
        expected.append(ItemRecord(
            component="model", pattern="replicated", storage_key="model", fqn=res.index.fqn,
            kind="tensor" if tensor else "bytes", dtype="torch.float32" if tensor else None,
            shape=tuple(md.size) if tensor else None, chunk_offsets=offsets, chunk_sizes=(1, 3) if tensor else None,
            file=info.relative_path, offset=info.offset, length=info.length, checksum=info.checksum, rank=info.rank,
            data_offset=info.data_offset, key_path=info.key_path, math_bits=info.math_bits,
            gap_offset=info.gap_offset, gap_length=info.gap_length))
    expected.sort(key=lambda r: (r.fqn, r.chunk_offsets or ()))
    assert record_columns(expected) == columns
    assert encode_columns(columns) == encode_index(expected)
    assert decode_index(encode_columns(columns)) == expected
    assert component_manifests_of(columns, layouts, Topology(rank=0, world_size=4)) == component_manifests(
        expected, layouts, Topology(rank=0, world_size=4))


RANK_KEY = str(StorageKey("rng", SharingPattern.PER_RANK, rank=1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["model", "opt", RANK_KEY]), st.integers(0, 3), st.integers(1, 500),
                          st.one_of(st.none(), st.integers(0, 100)), st.text("0123456789abcdef", min_size=1,
                                                                            max_size=4)), max_size=25))
def test_each_copy_sums_its_records_wherever_they_come_in_the_list(rows: list) -> None:
    records = [new_record({
        "component": parse_storage_key(key).component, "pattern": "replicated", "storage_key": key, "fqn": f"{key}.v{i}",
        "kind": "bytes", "dtype": None, "shape": None, "chunk_offsets": None, "chunk_sizes": None,
        "file": "__0_0.distcp", "offset": 0, "length": length + (gap or 0), "checksum": checksum, "rank": rank,
        "data_offset": None, "key_path": None, "math_bits": None, "gap_offset": 0 if gap else None,
        "gap_length": gap}) for i, (key, rank, length, gap, checksum) in enumerate(rows)]
    layouts = {"model": ComponentLayout("model", SharingPattern.REPLICATED),
               "opt": ComponentLayout("opt", SharingPattern.REPLICATED),
               "rng": ComponentLayout("rng", SharingPattern.PER_RANK)}
    manifests = component_manifests(records, layouts, Topology(rank=0, world_size=4))
    for key in {r.storage_key for r in records}:
        mine = [r for r in records if r.storage_key == key]
        copy = manifests[parse_storage_key(key).component].copies[key]
        assert copy.size_bytes == sum(r.stored_bytes for r in mine)
        assert copy.writers == sorted({r.rank for r in mine})
        assert copy.checksum == combine_checksums([r.checksum for r in mine])
