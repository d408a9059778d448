"""Packs (dcp_forge/format/pack.py): every item's range is a zip ``torch.load`` reads back bit for bit,
its own bytes are exactly what ``records_problem`` expects, and any change to them is caught."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcp_forge.format import pack as pack_module
from dcp_forge.format.index import own_pieces
from dcp_forge.format.pack import (
    DATA_OFFSET,
    PACKED_TENSOR_MAX_BYTES,
    SMALL_ITEM_BYTES,
    VALUE_OFFSET,
    data_header,
    pack_in_memory,
    packable_tensor,
    records_problem,
    shared_records_problem,
    value_pickle,
    value_zip,
)
from dcp_forge.format.torch_blob import open_blob, tensor_blob_layout
from tests.support.strategies import SAVABLE_DTYPES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_shapes = st.lists(st.integers(0, 9), max_size=3).map(tuple)


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


_values = st.recursive(st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=8), st.none(),
                                 st.binary(min_size=1, max_size=8)),
                       lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                                               st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                       max_leaves=8)
_entries = st.lists(st.one_of(st.tuples(st.sampled_from(SAVABLE_DTYPES), _shapes, st.integers(0, 9)), _values),
                    min_size=1, max_size=12)


def _pack(entries) -> tuple[bytes, list, list]:
    stored, kept = [], []
    for entry in entries:
        if isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[0], torch.dtype):
            tensor = _tensor(*entry)
            stored.append(tensor)
            kept.append(tensor)
        else:
            saved = io.BytesIO()
            torch.save(entry, saved)
            pickled = value_pickle(saved.getvalue())
            assert pickled is not None
            stored.append(pickled)
            kept.append(entry)
    pack, items = pack_in_memory(stored)
    return pack, items, kept


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=_entries)
def test_every_item_of_a_pack_loads_back_exactly_and_its_records_are_the_expected_ones(entries):
    pack, items, kept = _pack(entries)
    covered = bytearray(len(pack))
    for item, value in zip(items, kept, strict=True):
        item_range = bytes(pack[item.offset:item.offset + item.length])
        loaded = torch.load(io.BytesIO(item_range), weights_only=True)  # what plain DCP does with the range
        (head_at, head_length), (tail_at, tail_length) = own_pieces(item.length, item.gap_offset, item.gap_length)
        head, tail = item_range[head_at:head_at + head_length], item_range[tail_at:tail_at + tail_length]
        for start, length in ((item.offset + head_at, head_length), (item.offset + tail_at, tail_length)):
            covered[start:start + length] = bytes(a + 1 for a in covered[start:start + length])
        described = (value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else None
        assert shared_records_problem(tail, tail_at, described, lambda o, n, r=item_range: r[o:o + n]) is None
        checksum = xxhash.xxh3_64(head)
        checksum.update(tail)
        assert checksum.hexdigest() == item.checksum
        if isinstance(value, torch.Tensor):
            assert loaded.dtype == value.dtype and loaded.shape == value.shape and _raw(loaded) == _raw(value)
            assert item.data_offset == DATA_OFFSET and head[DATA_OFFSET:] == _raw(value)
            assert records_problem(head, tail, tail_at, (value.dtype, tuple(value.shape))) is None
            layout = tensor_blob_layout(open_blob(lambda o, n, r=item_range: r[o:o + n], len(item_range)))
            assert (layout.data_offset, layout.dtype, layout.shape) == (DATA_OFFSET, value.dtype, tuple(value.shape))
        else:
            assert pickle.dumps(loaded) == pickle.dumps(value)
            assert records_problem(head, tail, tail_at, None) is None
            assert pickle.dumps(torch.load(io.BytesIO(value_zip(head)), weights_only=True)) == pickle.dumps(value)
    assert set(covered) == {1}  # every byte of the pack is owned by exactly one item


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=_entries, data=st.data())
def test_a_changed_record_byte_is_seen(entries, data):
    pack, items, kept = _pack(entries)
    index = data.draw(st.integers(0, len(items) - 1))
    item, value = items[index], kept[index]
    item_range = bytearray(pack[item.offset:item.offset + item.length])
    (_, head_length), (tail_at, tail_length) = own_pieces(item.length, item.gap_offset, item.gap_length)
    tensor = isinstance(value, torch.Tensor)
    # a byte of the zip records (not of the tensor's bytes or the value's pickle: only the checksum covers those)
    records = [*range(DATA_OFFSET if tensor else VALUE_OFFSET), *range(tail_at, item.length)]
    at = data.draw(st.sampled_from(records))
    item_range[at] ^= data.draw(st.integers(1, 255))
    head, tail = item_range[:head_length], item_range[tail_at:]
    described = (value.dtype, tuple(value.shape)) if tensor else None
    assert (records_problem(head, tail, tail_at, described) is not None
            or shared_records_problem(tail, tail_at, described, lambda o, n: item_range[o:o + n]) is not None)


def test_a_large_tensor_is_written_from_its_own_memory_between_small_heads():
    small, large = torch.arange(10.0), torch.arange(SMALL_ITEM_BYTES, dtype=torch.float32)
    pack, items = pack_in_memory([small, large, small])
    for item, tensor in zip(items, (small, large, small), strict=True):
        loaded = torch.load(io.BytesIO(pack[item.offset:item.offset + item.length]), weights_only=True)
        assert torch.equal(loaded, tensor)


def _item_parts(pack: bytes, item) -> tuple[bytes, bytes, int]:
    """An item's range, its trailer, and where that starts in the range."""
    item_range = pack[item.offset:item.offset + item.length]
    (_, _), (tail_at, _) = own_pieces(item.length, item.gap_offset, item.gap_length)
    return item_range, item_range[tail_at:], tail_at


def test_tensors_of_one_dtype_and_shape_share_one_data_pkl_record():
    same = [torch.full((3, 2), float(i)) for i in range(4)]
    pack, items = pack_in_memory(same)
    apart, _ = pack_in_memory([torch.full((3, i + 1), float(i)) for i in range(4)])
    assert pack.count(b"_rebuild_tensor_v2") == 1 and apart.count(b"_rebuild_tensor_v2") == 4
    assert len(pack) < len(apart)
    for item, tensor in zip(items, same, strict=True):
        item_range, tail, tail_at = _item_parts(pack, item)
        assert torch.equal(torch.load(io.BytesIO(item_range), weights_only=True), tensor)
        assert shared_records_problem(tail, tail_at, (torch.float32, (3, 2)), lambda o, n, r=item_range: r[o:o + n]) is None
    # the record lies in the first trailer: damaged there, every tensor naming it is told
    damaged = bytearray(pack)
    at = pack.index(b"_rebuild_tensor_v2")
    damaged[at] ^= 1
    for item in items[1:]:
        item_range, tail, tail_at = _item_parts(bytes(damaged), item)
        assert records_problem(item_range[:item.gap_offset], tail, tail_at, (torch.float32, (3, 2))) is None
        why = shared_records_problem(tail, tail_at, (torch.float32, (3, 2)), lambda o, n, r=item_range: r[o:o + n])
        assert "data.pkl record of a torch.float32 tensor [3, 2]" in why


def test_a_pack_as_format_2_wrote_it_still_reads():
    # format 2 gave every tensor's trailer a data.pkl record of its own
    tensors = [torch.zeros(3), torch.ones(3), torch.full((3,), 2.0)]
    heads = [data_header(12) + _raw(t) for t in tensors]
    starts = [sum(map(len, heads[:i])) for i in range(len(heads))]
    version_at = at = sum(map(len, heads))
    trailers = []
    for start in starts:
        trailers.append(pack_module._trailer((torch.float32, (3,)), 12, at - start, version_at - start, None))
        at += len(trailers[-1])
    pack = b"".join(heads + trailers)
    assert pack.count(b"_rebuild_tensor_v2") == 3
    for i, (start, tensor) in enumerate(zip(starts, tensors, strict=True)):
        end = version_at + sum(map(len, trailers[:i + 1]))
        item_range, tail_at = pack[start:end], end - start - len(trailers[i])
        assert torch.equal(torch.load(io.BytesIO(item_range), weights_only=True), tensor)
        assert records_problem(heads[i], trailers[i], tail_at, (torch.float32, (3,))) is None
        assert shared_records_problem(trailers[i], tail_at, (torch.float32, (3,)),
                                      lambda o, n, r=item_range: r[o:o + n]) is None


def test_a_data_pkl_record_named_outside_the_gap_is_a_problem():
    pack, items = pack_in_memory([torch.zeros(2), torch.ones(2)])
    item_range, tail, tail_at = _item_parts(pack, items[1])
    # the data.pkl entry is the second of the central directory: its header offset, pointed into the head
    directory = int.from_bytes(tail[-6:-2], "little") - tail_at
    pickle_entry = directory + 46 + len(b"a/version")
    for pointed in (0, DATA_OFFSET, tail_at - 1):
        forged = bytearray(tail)
        forged[pickle_entry + 42:pickle_entry + 46] = pointed.to_bytes(4, "little")
        why = records_problem(item_range[:items[1].gap_offset], forged, tail_at, (torch.float32, (2,)))
        assert why is not None


def test_another_dtype_or_shape_than_recorded_is_a_problem():
    pack, items, kept = _pack([(torch.float32, (4, 2), 0)])
    item = items[0]
    (_, head_length), (tail_at, _) = own_pieces(item.length, item.gap_offset, item.gap_length)
    head, tail = pack[:head_length], pack[tail_at:item.length]
    assert records_problem(head, tail, tail_at, (torch.float32, (4, 2))) is None
    assert "torch.int32" in records_problem(head, tail, tail_at, (torch.int32, (4, 2)))
    assert records_problem(head, tail, tail_at, (torch.float32, (2, 4))) is not None
    assert records_problem(head, tail, tail_at, None) is not None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 3, 2**31 - 1, 2**31, 2**40]), max_size=3).filter(lambda s: math.prod(n for n in s if n) < 2**62),
       st.sampled_from([torch.uint8, torch.float32, torch.float64]))
def test_a_packed_shape_fits_the_pickle_whatever_the_sizes(sizes, dtype):
    # Sizes are looked at for empty tensors only: a tensor holding an element is packed only with
    # every size at most its bytes, which BININT holds. Both kinds checked against the full rule.
    tensor = torch.zeros(1, dtype=dtype).as_strided(sizes, [0] * len(sizes))  # no memory, whatever its sizes
    fits = tensor.nbytes <= PACKED_TENSOR_MAX_BYTES and max(sizes, default=0) <= 2**31 - 1
    assert packable_tensor(tensor) == fits, (sizes, dtype)


def test_what_is_packed():
    assert packable_tensor(torch.ones(3)) and packable_tensor(torch.ones(())) and packable_tensor(torch.ones(0, 5))
    assert packable_tensor(torch.ones(4, 4).t())  # stored contiguous
    assert packable_tensor(torch.ones(SMALL_ITEM_BYTES))  # larger ones go into large packs
    # beyond the reach of a zip without zip64 records: a torch.save zip of its own (expanded: no memory)
    assert not packable_tensor(torch.ones(1, dtype=torch.uint8).expand(PACKED_TENSOR_MAX_BYTES + 1))
    assert not packable_tensor(torch.ones(2, dtype=torch.complex64).conj())  # flags stay in a zip of its own
    assert not packable_tensor(torch.nn.Parameter(torch.ones(2)))  # writers pack what they detached
    assert not packable_tensor(torch.quantize_per_tensor(torch.ones(2), 0.5, 0, torch.qint8))
    assert not packable_tensor(torch.ones(3).to_sparse())
    with_tensor = io.BytesIO()
    torch.save({"t": torch.ones(2)}, with_tensor)
    assert value_pickle(with_tensor.getvalue()) is None  # a value holding storages keeps its own zip
    assert value_pickle(b"not a zip at all, not even close") is None


@pytest.mark.parametrize("dtype", SAVABLE_DTYPES)
def test_each_dtype_loads_through_torch_load_as_torch_save_stores_it(dtype):
    tensor = _tensor(dtype, (3, 2), 1)
    pack, items, _ = _pack([(dtype, (3, 2), 1)])
    ours = torch.load(io.BytesIO(bytes(pack[:items[0].length])), weights_only=True)
    saved = io.BytesIO()
    torch.save(tensor, saved)
    theirs = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    assert ours.dtype == theirs.dtype == dtype and _raw(ours) == _raw(theirs) == _raw(tensor)
