"""index.parquet: records round-trip exactly, and the columnar reader refuses a wrong schema."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_forge.index import ItemRecord, decode_index, encode_index, read_index_table

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
