"""The rows of ``index.parquet`` a reader accepts: the vectorised pass that proves a whole index well
formed accepts exactly what the row-by-row pass accepts, and a damaged row is still named; a row agrees
with ``.metadata`` exactly when their facts are equal."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_forge.format.index import ItemRecord, encode_index, read_index_table, records_from_table
from dcp_forge.storage.consistency import _malformed_rows, _rows_well_formed, parse_index
from dcp_forge.storage.cross_check import ItemFacts, _agrees, _record_facts


def _rows(count: int) -> list[ItemRecord]:
    """Rows as a save writes them: packed tensors, a plain tensor blob, packed and plain values."""
    rows = []
    for i in range(count):
        kind = ("packed", "blob", "value", "packed value")[i % 4]
        tensor = kind in ("packed", "blob")
        gap = (70 + i, 300) if kind.startswith("packed") else (None, None)
        rows.append(ItemRecord(
            "model", "replicated", "model", f"model.layers.{i}.w", "tensor" if tensor else "bytes",
            "torch.float32" if tensor else None, (i + 1,) if tensor else None, (0,) if tensor else None,
            (i + 1,) if tensor else None, "__0_0.distcp", 1000 * i, 900, f"{i:016x}", 0,
            64 if tensor else None, None, None, *gap))
    return rows


_DAMAGE = {
    "negative offset": lambda r: dataclasses.replace(r, offset=-1),
    "negative length": lambda r: dataclasses.replace(r, length=-5),
    "negative rank": lambda r: dataclasses.replace(r, rank=-1),
    "negative data offset": lambda r: dataclasses.replace(r, data_offset=-3),
    "half a gap": lambda r: dataclasses.replace(r, gap_offset=None if r.gap_offset is not None else 4),
    "negative gap": lambda r: dataclasses.replace(r, gap_offset=-1, gap_length=2),
    "gap past the end": lambda r: dataclasses.replace(r, gap_offset=r.length, gap_length=1),
    "overflowing gap": lambda r: dataclasses.replace(r, gap_offset=2**63 - 1, gap_length=2**63 - 1),
    "packed tensor without data offset": lambda r: dataclasses.replace(
        r, kind="tensor", shape=(1,), gap_offset=1, gap_length=1, data_offset=None),
    "unknown kind": lambda r: dataclasses.replace(r, kind="blob"),
    "tensor without shape": lambda r: dataclasses.replace(r, kind="tensor", shape=None),
    "bytes with a shape": lambda r: dataclasses.replace(r, kind="bytes", shape=(1,)),
    "fqn of another key": lambda r: dataclasses.replace(r, fqn="other." + r.fqn),
    "key of another component": lambda r: dataclasses.replace(r, component="optim"),
    "pattern the key does not name": lambda r: dataclasses.replace(r, pattern="per_rank"),
    "namespaced key, its own pattern": lambda r: dataclasses.replace(
        r, storage_key="model@rank0", pattern="per_rank", fqn="model@rank0." + r.fqn.split(".", 1)[1]),
    "unparseable key": lambda r: dataclasses.replace(r, storage_key="a@@b", component="a", fqn="a@@b.x"),
    "harmless: another checksum": lambda r: dataclasses.replace(r, checksum="0" * 16),
}


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 9), st.lists(st.tuples(st.integers(0, 8), st.sampled_from(sorted(_DAMAGE))), max_size=3),
       st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.sampled_from(["location", "chunk"])), max_size=2))
def test_the_vectorised_pass_accepts_what_the_row_pass_accepts(count, damage, copies):
    rows = _rows(count)
    for i, how in damage:
        if i < len(rows):
            rows[i] = _DAMAGE[how](rows[i])
    for i, j, what in copies:  # a row claiming another's location or chunk
        if i < len(rows) and j < len(rows) and i != j:
            source = rows[j]
            rows[i] = dataclasses.replace(rows[i], **({"file": source.file, "offset": source.offset}
                                                       if what == "location" else
                                                       {"fqn": source.fqn, "chunk_offsets": source.chunk_offsets}))
    table = read_index_table(encode_index(rows))
    records = records_from_table(table)
    assert _rows_well_formed(table, records) == (not _malformed_rows(records))
    found, problems = parse_index(encode_index(rows), "ckpt")
    assert bool(problems) == bool(_malformed_rows(records))
    if not problems:
        assert found == records


_small_tuples = st.one_of(st.none(), st.lists(st.integers(0, 2), max_size=2).map(tuple))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["m.a", "m.b"]), _small_tuples, st.sampled_from(["tensor", "bytes"]),
       st.sampled_from([None, "torch.float32", "torch.int32"]), _small_tuples, _small_tuples, st.integers(0, 2),
       st.data())
def test_an_index_row_agrees_with_the_metadata_exactly_when_their_facts_are_equal(
        fqn, offsets, kind, dtype, shape, sizes, length, data):
    record = ItemRecord("m", "replicated", "m", fqn, kind, dtype, shape, offsets, sizes, "f", 0, length, "c", 0)
    facts = _record_facts(record)
    # the metadata's facts: the row's own, or with one field changed
    field = data.draw(st.sampled_from([None, *ItemFacts._fields]))
    if field is not None:
        other = {"fqn": st.sampled_from(["m.a", "m.b"]), "chunk_offsets": _small_tuples.map(lambda t: t or ()),
                 "kind": st.sampled_from(["tensor", "bytes"]),
                 "dtype": st.sampled_from([None, "torch.float32", "torch.int32"]), "shape": _small_tuples,
                 "chunk_sizes": _small_tuples, "length": st.integers(0, 2)}[field]
        facts = facts._replace(**{field: data.draw(other)})
    assert _agrees(record, facts) == (_record_facts(record) == facts)
