"""index.parquet: records round-trip exactly, and the columnar reader refuses a wrong schema."""

from __future__ import annotations

import io
import os
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_forge import CheckpointCoordinator, RNGState, StateComponent
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.core.tensors import narrow_box
from dcp_forge.format.index import (
    INDEX_SCHEMA,
    ItemRecord,
    decode_index,
    encode_index,
    new_record,
    own_pieces,
    read_index_table,
)
from dcp_forge.format.manifest import checksum_bytes
from dcp_forge.format.names import INDEX_FILE
from tests.support.paths import REPO

_boxes = st.one_of(st.none(), st.just(()), st.lists(st.integers(0, 2**40), min_size=1, max_size=4).map(tuple))
records = st.builds(
    ItemRecord, component=st.text(max_size=4), pattern=st.sampled_from(["replicated", "per_rank"]),
    storage_key=st.text(max_size=6), fqn=st.text(max_size=8), kind=st.sampled_from(["tensor", "bytes"]),
    dtype=st.one_of(st.none(), st.just("torch.bfloat16")), shape=_boxes, chunk_offsets=_boxes, chunk_sizes=_boxes,
    file=st.text(max_size=6), offset=st.integers(0, 2**50), length=st.integers(0, 2**40),
    checksum=st.text(max_size=16), rank=st.integers(0, 2**20))


@settings(max_examples=150, deadline=None)
@given(st.lists(records, max_size=8))
def test_records_round_trip(rows):
    assert decode_index(encode_index(rows)) == rows


def test_columnar_reader_selects_and_checks_columns():
    rows = [ItemRecord("m", "replicated", "m", "m.w", "tensor", "torch.float32", (2, 3), (0, 0), (2, 3), "f", 0, 9,
                       "ab", 0)]
    table = read_index_table(encode_index(rows), ["fqn", "length"])
    assert table.column_names == ["fqn", "length"] and table.to_pylist() == [{"fqn": "m.w", "length": 9}]
    with pytest.raises(ValueError, match="no column"):
        read_index_table(encode_index(rows), ["nope"])
    sink = io.BytesIO()
    pq.write_table(pa.table({"fqn": pa.array([1], pa.int64())}), sink)
    with pytest.raises(ValueError, match="'fqn' is int64, expected string"):
        read_index_table(sink.getvalue(), ["fqn"])


# The list of what each row tells (component, pattern, storage key, fqn, rank that wrote it, file,
# offset, length, dtype, shape, chunk offsets, checksum), as schema columns.
_PROMISED = ["component", "pattern", "storage_key", "fqn", "rank", "file", "offset", "length", "dtype", "shape",
             "chunk_offsets", "checksum"]


def _documented_columns() -> list[tuple[str, str]]:
    """(column, type) pairs of the index table in docs/FORMAT.md, in order (``a, b | t1, t2`` rows split)."""
    doc = (REPO / "docs" / "FORMAT.md").read_text()
    section = doc.split("## `index.parquet`", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    out = []
    for names, types, _meaning in rows[2:]:  # rows[0:2]: header and separator
        names = [n.strip() for n in names.split(",")]
        types = [t.strip() for t in types.split(",")]
        out += list(zip(names, types * len(names) if len(types) == 1 else types, strict=True))
    return out


def test_format_doc_lists_exactly_the_written_columns():
    written = [(f.name, str(f.type).replace("list<item: int64>", "list<int64>")) for f in INDEX_SCHEMA]
    assert _documented_columns() == written
    assert set(_PROMISED) <= set(INDEX_SCHEMA.names)


def test_saved_index_rows_point_at_their_stored_bytes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)  # 8 KiB weight: cut into row-chunks by ChunkPolicy(2048, 2)
    comps = [StateComponent("model", model, "replicated"), StateComponent("rng", RNGState(), "per_rank")]
    path = CheckpointCoordinator(comps, output_dir=tmp_path, chunk_policy=ChunkPolicy(2048, 2)).save_checkpoint(
        checkpoint_id="checkpoint-1")
    rows = decode_index(Path(os.path.join(path, INDEX_FILE)).read_bytes())
    assert {(r.component, r.pattern, r.storage_key) for r in rows} == {
        ("model", "replicated", "model"), ("rng", "per_rank", "rng@rank0")}
    weight_chunks = [r for r in rows if r.fqn == "model.weight"]
    assert all(r.gap_offset is not None for r in weight_chunks)  # small chunks: packed, each still a zip
    assert len(weight_chunks) > 1 and sum(r.chunk_sizes[0] for r in weight_chunks) == 32
    for r in rows:
        assert r.rank == 0
        with open(os.path.join(path, r.file), "rb") as f:
            f.seek(r.offset)
            blob = f.read(r.length)
        owned = blob if r.gap_offset is None else b"".join(
            blob[start:start + length] for start, length in own_pieces(r.length, r.gap_offset, r.gap_length))
        assert len(blob) == r.length and checksum_bytes(owned) == r.checksum, r
        if r.kind == "tensor":
            value = torch.load(io.BytesIO(blob), weights_only=True)
            assert str(value.dtype) == r.dtype and tuple(value.shape) == r.chunk_sizes
        if r.fqn.startswith("model."):
            source = model.state_dict()[r.fqn.split(".", 1)[1]]
            assert r.shape == tuple(source.shape)
            assert torch.equal(value, narrow_box(source, r.chunk_offsets, r.chunk_sizes))


def test_decoded_records_are_the_records_their_constructor_builds():
    # Decoding sets each record's fields at once, bypassing __init__: a __post_init__ would be skipped.
    assert not hasattr(ItemRecord, "__post_init__")
    rows = [ItemRecord("m", "replicated", "m", "m.w", "tensor", "torch.float32", (2, 3), (0, 0), (2, 3), "f", 0, 9,
                       "ab", 0, 38, None, "conj", 4, 5)]
    decoded = decode_index(encode_index(rows))
    assert decoded == rows and vars(decoded[0]) == vars(rows[0]) and hash(decoded[0]) == hash(rows[0])


@settings(max_examples=100, deadline=None)
@given(records)
def test_a_record_built_at_once_is_the_record_its_constructor_builds(record):
    built = new_record({f.name: getattr(record, f.name) for f in fields(ItemRecord)})
    assert built == record and vars(built) == vars(record) and hash(built) == hash(record)
    assert repr(built) == repr(record) and list(vars(built)) == [f.name for f in fields(ItemRecord)]
