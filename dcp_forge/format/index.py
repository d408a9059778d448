"""The per-checkpoint item index (``index.parquet``): one row per stored item.

Each row says where one stored item lives (file, offset, length), what it is (component, storage
key, fqn, dtype, shape, chunk box), who wrote it, its xxh3 checksum, for large plain tensors and
packed ones where the tensor's bytes start inside it, and for packed items which bytes of their
range belong to other items (format/pack.py). Readers verify checksums from it and read such tensors in
one request; inspection tools read it instead of unpickling DCP's metadata.
"""

from __future__ import annotations

import io
import operator
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class StoredItem:
    """What a writer reports for one item it wrote (carried in DCP's ``WriteResult.storage_data``)."""

    relative_path: str
    offset: int
    length: int
    checksum: str  # xxh3_64 hex of the stored bytes
    rank: int
    data_offset: int | None = None  # where a plain tensor's bytes start inside the item (torch_blob.py)
    key_path: str | None = None  # the value's keys below its component, when one is not a str (key_paths.py)
    math_bits: str | None = None  # the lazy-view flags of a tensor written resolved (values.py)
    gap_offset: int | None = None  # a packed item's gap: the bytes of other items inside its range (pack.py)
    gap_length: int | None = None


@dataclass(frozen=True)
class ItemRecord:
    component: str
    pattern: str
    storage_key: str
    fqn: str
    kind: str  # "tensor" or "bytes"
    dtype: str | None
    shape: tuple[int, ...] | None  # full tensor shape
    chunk_offsets: tuple[int, ...] | None
    chunk_sizes: tuple[int, ...] | None
    file: str
    offset: int
    length: int
    checksum: str
    rank: int
    # Where the tensor's bytes start inside the stored item, for a tensor blob a reader can fill its
    # destination from in one read; None for bytes, small tensors, and indexes written before it existed.
    data_offset: int | None = None
    # The value's real keys below its component (key_paths.encode_path) where one of them is not a str,
    # and a tensor's lazy-view flags ("conj", "neg", "conj+neg"; values.py); null otherwise.
    key_path: str | None = None
    math_bits: str | None = None
    # For an item stored in a pack (format/pack.py): the bytes of its range that belong to other items
    # of the pack, from ``offset + gap_offset``; its checksum covers the rest. Null for other items.
    gap_offset: int | None = None
    gap_length: int | None = None

    @property
    def location(self) -> tuple[str, int]:
        return (self.file, self.offset)

    @property
    def stored_bytes(self) -> int:
        """The bytes this item owns: its range without its gap (what its checksum covers)."""
        return self.length - (self.gap_length or 0)

    @property
    def pieces(self) -> tuple[tuple[int, int], ...]:
        """(offset in the file, length) of the bytes this item owns, in file order (file_pieces)."""
        gap = (self.gap_offset, self.gap_length) if self.gap_offset is not None and self.gap_length is not None else None
        return file_pieces(self.offset, self.length, gap)


def own_pieces(length: int, gap_offset: int, gap_length: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(start, length) of the two pieces a packed item owns inside its range of ``length`` bytes: its
    head, before its gap, and its trailer, after it."""
    trailer = gap_offset + gap_length
    return (0, gap_offset), (trailer, length - trailer)


def file_pieces(offset: int, length: int, gap: tuple[int, int] | None) -> tuple[tuple[int, int], ...]:
    """(offset in the file, length) of the bytes an item stored at ``offset`` owns, which its checksum
    covers: its whole range, or for a packed item (``gap``: offset from ``offset``, length) its range
    without the gap."""
    if gap is None:
        return ((offset, length),)
    return tuple((offset + start, size) for start, size in own_pieces(length, *gap))


INDEX_SCHEMA = pa.schema([
    ("component", pa.string()),
    ("pattern", pa.string()),
    ("storage_key", pa.string()),
    ("fqn", pa.string()),
    ("kind", pa.string()),
    ("dtype", pa.string()),
    ("shape", pa.list_(pa.int64())),
    ("chunk_offsets", pa.list_(pa.int64())),
    ("chunk_sizes", pa.list_(pa.int64())),
    ("file", pa.string()),
    ("offset", pa.int64()),
    ("length", pa.int64()),
    ("checksum", pa.string()),
    ("rank", pa.int32()),
    ("data_offset", pa.int64()),
    ("key_path", pa.string()),
    ("math_bits", pa.string()),
    ("gap_offset", pa.int64()),
    ("gap_length", pa.int64()),
])

# Columns added after the first release: an index written before them reads them as all-null.
_OPTIONAL_COLUMNS = frozenset({"data_offset", "key_path", "math_bits", "gap_offset", "gap_length"})


RECORD_FIELDS = tuple(f.name for f in fields(ItemRecord))
_record_row = operator.attrgetter(*RECORD_FIELDS)


def new_record(fields: dict[str, Any]) -> ItemRecord:
    """The ``ItemRecord`` with ``fields`` (every field, by name, in field order), set at once: a frozen
    dataclass's ``__init__`` sets them one ``object.__setattr__`` at a time, which a save of many
    items pays once per item. ItemRecord has no ``__post_init__`` to skip."""
    record = object.__new__(ItemRecord)
    object.__setattr__(record, "__dict__", fields)
    return record


# The index's columns by name, each holding one value per item (in INDEX_SCHEMA's order, which is
# ItemRecord's field order): how a commit builds the index without a record per item.
IndexColumns = dict[str, list[Any]]


def record_columns(records: Sequence[ItemRecord]) -> IndexColumns:
    """The columns of ``records``."""
    # Row by row, then transposed: one visit per record, where a pass per column would walk every
    # record once for each field.
    return row_columns(list(map(_record_row, records)))


def row_columns(rows: Sequence[tuple]) -> IndexColumns:
    """The columns of ``rows``, each a tuple of an item's values in RECORD_FIELDS order."""
    transposed = zip(*rows, strict=True) if rows else ([] for _ in RECORD_FIELDS)
    return {name: list(column) for name, column in zip(RECORD_FIELDS, transposed, strict=True)}


def encode_index(records: Sequence[ItemRecord]) -> bytes:
    return encode_columns(record_columns(records))


def encode_columns(columns: IndexColumns) -> bytes:
    """``index.parquet`` holding ``columns`` (every column of INDEX_SCHEMA)."""
    table = pa.table(columns, schema=INDEX_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS,
                   column_encoding=_COLUMN_ENCODINGS)
    return sink.getvalue()


# Byte positions and lengths grow item by item (packs write items in order): their differences are
# small. Names of neighbouring items share long prefixes. A checksum is unique to its item. Only the
# columns that repeat a few values (component, dtype, file, shapes...) gain from a dictionary.
_COLUMN_ENCODINGS = {**dict.fromkeys(("offset", "length", "data_offset", "gap_offset", "gap_length"),
                                     "DELTA_BINARY_PACKED"), "fqn": "DELTA_BYTE_ARRAY"}
_DICTIONARY_COLUMNS = [name for name in INDEX_SCHEMA.names if name not in _COLUMN_ENCODINGS and name != "checksum"]


def read_index_table(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """The index as an Arrow table with only ``columns`` (all by default), for columnar work.

    Reading a few columns of a 1,000,000-row index takes a fraction of a second, where building one
    ``ItemRecord`` per row takes many seconds: inspection tools stay columnar. Raises ValueError when
    a requested column is missing or has another type than the schema says.
    """
    wanted = list(columns) if columns is not None else INDEX_SCHEMA.names
    unknown = [c for c in wanted if c not in INDEX_SCHEMA.names]
    if unknown:
        raise ValueError(f"index.parquet has no column(s) {unknown} (columns: {INDEX_SCHEMA.names})")
    parquet = pq.ParquetFile(io.BytesIO(data))
    absent = [c for c in wanted if c in _OPTIONAL_COLUMNS and c not in parquet.schema_arrow.names]
    table = parquet.read(columns=[c for c in wanted if c not in absent])
    for name in absent:
        field = INDEX_SCHEMA.field(name)
        table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    table = table.select(wanted)
    for name in wanted:
        if table.schema.field(name).type != INDEX_SCHEMA.field(name).type:
            raise ValueError(f"index.parquet column {name!r} is {table.schema.field(name).type}, expected "
                             f"{INDEX_SCHEMA.field(name).type}")
    return table


def _tuples(column: pa.ChunkedArray) -> list[tuple[int, ...] | None]:
    """A list<int64> column as Python tuples, built from its flat values (to_pylist makes lists first)."""
    column = column.combine_chunks()
    if not len(column):
        return []
    offsets = column.offsets.to_numpy().tolist()
    values = column.values.to_numpy(zero_copy_only=False).tolist()
    valid = column.is_valid().to_pylist()
    return [tuple(values[offsets[i]:offsets[i + 1]]) if valid[i] else None for i in range(len(column))]


_TUPLE_COLUMNS = ("shape", "chunk_offsets", "chunk_sizes")


def decode_index(data: bytes) -> list[ItemRecord]:
    return records_from_table(read_index_table(data))


def records_from_table(table: pa.Table) -> list[ItemRecord]:
    """One ``ItemRecord`` per row of an index table with every column (``read_index_table``)."""
    # Column by column, then one record per row: twice as fast as table.to_pylist()'s dict per row.
    names = RECORD_FIELDS
    columns = [_tuples(table[name]) if name in _TUPLE_COLUMNS else table[name].to_pylist() for name in names]
    return [new_record(dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]


def records_as_dicts(records: Iterable[ItemRecord]) -> list[dict]:
    return [asdict(r) for r in records]
