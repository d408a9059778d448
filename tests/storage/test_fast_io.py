"""The fast save/load paths: CRC-less torch.save blobs, locating a tensor inside its blob, reading
straight into destination tensors, the staged fallback, and checksum verification on both paths."""

from __future__ import annotations

import io
import math
import os
import time
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException

from dcp_forge import CheckpointCoordinator, StateComponent
from dcp_forge.core.tensors import dtype_named, math_bits, raw_view
from dcp_forge.errors import IntegrityError, first_rank_failure
from dcp_forge.format.torch_blob import (
    NotPlainTensor,
    layout_from_edges,
    open_blob,
    save_tensor,
    tensor_blob_layout,
)
from dcp_forge.storage import ForgeStorageReader, open_reader
from dcp_forge.storage.item_reader import DIRECT_MIN_BYTES, PipelinedChecker, StoredRead, split_runs
from tests.support.local_reads import record_local_reads
from tests.support.strategies import DTYPES
from tests.support.tamper import set_data_offsets

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _blob(tensor: torch.Tensor, saver=save_tensor) -> bytes:
    buf = io.BytesIO()
    saver(tensor, buf)
    return buf.getvalue()


def _layout(data: bytes):
    return tensor_blob_layout(open_blob(lambda o, n: data[o:o + n], len(data)))


@st.composite
def stored_tensors(draw) -> tuple[torch.Tensor, bool]:
    """A tensor as a writer may store it, and whether it is plain (whole, contiguous storage), among
    them the dtypes torch pickles with ``_rebuild_tensor_v3`` and lazy conjugate / negative views."""
    shape = tuple(draw(st.lists(st.integers(0, 7), max_size=3)))
    dtype = draw(st.sampled_from([*DTYPES, torch.bool, torch.complex64, torch.float64, torch.uint16,
                                  torch.float8_e4m3fn, torch.complex32, torch.bits8]))
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8)
    base = (raw & 1 if dtype == torch.bool else raw).view(dtype).reshape(shape)
    form = draw(st.sampled_from(["plain", "transposed", "view", "conj", "neg"]))
    if form == "transposed" and base.dim() >= 2:
        # Still in row-major order when either swapped dimension has one element: the stride of a
        # dimension of size 1 never moves, whatever it says. An empty tensor has no layout to get wrong.
        return base.transpose(0, 1), base.numel() == 0 or base.shape[0] == 1 or base.shape[1] == 1
    if form == "view" and base.numel() > 1:
        return base.reshape(-1)[1:], False
    if form == "conj" and dtype.is_complex:
        return base.conj(), True
    if form == "neg" and dtype in (torch.float32, torch.int64, torch.complex64):
        return torch._neg_view(base), True
    return base, True


def _storage_bytes(tensor: torch.Tensor) -> bytes:
    return raw_view(tensor).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@settings(max_examples=60, deadline=None)
@given(stored_tensors(), st.booleans())
def test_layout_finds_exactly_the_tensor_bytes_or_refuses(case, ours):
    tensor, plain = case
    data = _blob(tensor, save_tensor if ours else torch.save)
    loaded = torch.load(io.BytesIO(data), weights_only=True)  # CRC-less blobs still load
    assert _storage_bytes(loaded) == _storage_bytes(tensor) and math_bits(loaded) == math_bits(tensor)
    if not plain:
        with pytest.raises(NotPlainTensor):
            _layout(data)
        return
    layout = _layout(data)
    assert (layout.dtype, layout.shape, layout.nbytes, layout.math_bits) == (
        tensor.dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size(), math_bits(tensor))
    stored = bytes(data[layout.data_offset:layout.data_offset + layout.nbytes])
    assert stored == _storage_bytes(tensor)
    # what a writer or a reader finds from the blob's edges alone
    assert layout_from_edges(data[:layout.data_offset], data[layout.data_offset + layout.nbytes:], len(data)) == layout


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (1, 2, 3), (3, 1, 4)])
def test_a_dimension_of_one_element_keeps_any_stride_it_says(shape):
    # transposing a dimension of size 1 changes a stride torch's is_contiguous ignores, nothing else
    base = torch.arange(math.prod(shape), dtype=torch.int16).reshape(shape)
    tensor = base.transpose(0, 1)
    assert tensor.is_contiguous() and tensor.stride() != base.reshape(tensor.shape).stride()
    data = _blob(tensor, torch.save)
    layout = _layout(data)
    assert bytes(data[layout.data_offset:layout.data_offset + layout.nbytes]) == _storage_bytes(tensor)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 200_000), st.lists(st.integers(1, 300_000), min_size=1, max_size=12))
def test_the_writer_finds_each_blob_layout_however_torch_cuts_its_writes(numel, cuts):
    from dcp_forge.storage.writer import _HashingStream

    data = _blob(torch.arange(numel, dtype=torch.float32))
    stream = _HashingStream(io.BytesIO(b"x" * 7))  # an earlier item: offsets are the stream's
    stream.out.seek(7)
    stream.begin_item()
    view, at = memoryview(data), 0
    for cut in cuts * (len(data) // sum(cuts) + 1):
        stream.write(view[at:at + cut])
        at += cut
        if at >= len(data):
            break
    assert stream.end_item()[:2] == (7, len(data))
    assert stream.data_offset(len(data)) == _layout(data).data_offset


@pytest.mark.parametrize("value", [{"a": torch.ones(3)}, [torch.ones(2)], 7,
                                   torch.quantize_per_tensor(torch.ones(4), 0.5, 1, torch.qint8)])
def test_layout_refuses_anything_but_one_plain_tensor(value):
    with pytest.raises(NotPlainTensor):
        _layout(_blob(value, torch.save))


def test_layout_refuses_garbage_and_truncation():
    data = _blob(torch.ones(100))
    for bad in (b"", b"not a zip at all", data[:-30], data[:200]):
        with pytest.raises(NotPlainTensor):
            _layout(bad)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 1000), max_size=30), st.integers(1, 6))
def test_split_runs_keeps_order_and_balances(lengths, parts):
    reads = [StoredRead("f", i, n, ()) for i, n in enumerate(lengths)]
    runs = split_runs(reads, parts)
    assert [r for run in runs for r in run] == reads
    assert len(runs) <= parts and all(runs)
    if runs:
        # every run but the last ends at the first read that crosses its share of the bytes
        total = sum(lengths)
        assert max(sum(r.length for r in run) for run in runs) <= total / parts + max(lengths)


class _Holder:
    def __init__(self, tensors):
        self.tensors = tensors

    def state_dict(self):
        return self.tensors

    def load_state_dict(self, sd):
        for k, v in sd.items():
            if v is not self.tensors[k]:
                self.tensors[k].copy_(v)


def _big_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = DIRECT_MIN_BYTES // 2048  # "w" 8x, "h" 1x the direct-read threshold
    return {"w": torch.randn(4 * rows, 1024, generator=gen), "h": torch.randn(rows, 1024, generator=gen).bfloat16(),
            "small": torch.randn(10, generator=gen), "step": 3}


def _save(tmp_path, state, chunk_bytes=None):
    """A checkpoint of torch.save blobs (packs off): the layout of plain DCP checkpoints, of checkpoints
    written before packs, and of tensors no pack takes (tests/storage/test_packing.py tests packs)."""
    from dcp_forge.core.placement import ChunkPolicy
    from dcp_forge.storage import writer

    coord = CheckpointCoordinator([StateComponent("model", _Holder(state), "replicated")], output_dir=tmp_path,
                                  chunk_policy=ChunkPolicy(chunk_bytes) if chunk_bytes else ChunkPolicy())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer, "_packable", lambda item, data, form: None)
        return coord.save_checkpoint(checkpoint_id="c")


def _load(path, state, **reader_options):
    reader = open_reader(path, **reader_options)
    try:
        dcp.load({"model": _Holder(state)}, storage_reader=reader, no_dist=True)
    except CheckpointException as exc:  # DCP wraps the reader's error; show the original
        raise first_rank_failure(exc) from exc
    return reader


@pytest.fixture
def direct_reads(monkeypatch):
    """The fqns read by the direct path (the staged path is the fallback, so this must be observed)."""
    from dcp_forge.storage import item_reader

    seen = []
    original = item_reader._read_direct

    def counting(handle, read, *args):
        seen.append(read.fqn)
        return original(handle, read, *args)

    monkeypatch.setattr(item_reader, "_read_direct", counting)
    return seen


@pytest.mark.parametrize("threads", [1, 3])
def test_direct_and_staged_reads_restore_exact_values(tmp_path, threads, direct_reads):
    saved = _big_state()
    path = _save(tmp_path, saved)
    # contiguous destinations take the direct path; a transposed one (non-contiguous) the staged one
    dest = {"w": torch.zeros_like(saved["w"]), "h": torch.zeros(1024, saved["h"].shape[0]).bfloat16().t(),
            "small": torch.zeros(10), "step": 0}
    w_ptr = dest["w"].data_ptr()
    reader = _load(path, dest, thread_count=threads)
    assert torch.equal(dest["w"], saved["w"]) and dest["w"].data_ptr() == w_ptr
    assert torch.equal(dest["h"], saved["h"]) and torch.equal(dest["small"], saved["small"])
    assert reader.bytes_read > saved["w"].nbytes + saved["h"].nbytes
    assert direct_reads == ["model.w"]


def test_row_chunks_are_read_directly_into_their_rows(tmp_path, direct_reads):
    saved = _big_state()
    path = _save(tmp_path, saved, chunk_bytes=2 * DIRECT_MIN_BYTES)  # "w" stored as 4 row-chunks
    dest = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in saved.items()}
    _load(path, dest)
    assert all(torch.equal(dest[k], saved[k]) for k in ("w", "h", "small"))
    assert sorted(direct_reads) == ["model.h"] + ["model.w"] * 4


def test_the_index_records_where_each_large_tensor_starts(tmp_path):
    saved = _big_state()
    path = _save(tmp_path, saved)
    records = {r.fqn: r for r in _records(path)}
    for fqn in ("model.w", "model.h"):
        r = records[fqn]
        with open(os.path.join(path, r.file), "rb") as f:
            f.seek(r.offset + r.data_offset)
            stored = f.read(saved[fqn[6:]].nbytes)
        assert stored == saved[fqn[6:]].view(torch.uint8).numpy().tobytes()
    assert records["model.small"].data_offset is None and records["model.step"].data_offset is None


@pytest.mark.parametrize("threads", [1, 2])
def test_a_recorded_blob_is_one_read_straight_into_its_destination(tmp_path, monkeypatch, threads, direct_reads):
    saved = _big_state()
    path = _save(tmp_path, saved, chunk_bytes=2 * DIRECT_MIN_BYTES)  # "w" stored as 4 row-chunks
    records = [r for r in _records(path) if r.data_offset is not None]
    assert sorted(r.fqn for r in records) == ["model.h"] + ["model.w"] * 4
    dest = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in saved.items()}
    calls = record_local_reads(monkeypatch)
    _load(path, dest, thread_count=threads)
    assert all(torch.equal(dest[k], saved[k]) for k in ("w", "h", "small"))
    assert sorted(direct_reads) == ["model.h"] + ["model.w"] * 4
    for r in records:  # one request for the whole blob: header, tensor, trailer
        inside = [c for c in calls if c[0] == r.file and r.offset <= c[1] < r.offset + r.length]
        nbytes = math.prod(r.chunk_sizes) * dtype_named(r.dtype).itemsize
        assert inside == [(r.file, r.offset, [r.data_offset, nbytes, r.length - r.data_offset - nbytes])]


def test_an_index_without_data_offsets_reads_the_edges_first(tmp_path, monkeypatch, direct_reads):
    saved = _big_state()
    path = _save(tmp_path, saved)
    set_data_offsets(path, lambda r: None)  # as indexes written before the column existed
    dest = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in saved.items()}
    calls = record_local_reads(monkeypatch)
    _load(path, dest)
    assert all(torch.equal(dest[k], saved[k]) for k in ("w", "h", "small"))
    assert sorted(direct_reads) == ["model.h", "model.w"]
    assert all(len(views) == 1 for _, _, views in calls)


@pytest.mark.parametrize("shift", [64, -8])
def test_a_recorded_offset_the_blob_contradicts_is_refused(tmp_path, shift):
    saved = _big_state()
    path = _save(tmp_path, saved)
    set_data_offsets(path, lambda r: r.data_offset + shift if r.fqn == "model.w" else r.data_offset)
    dest = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in saved.items()}
    with pytest.raises(IntegrityError, match=r"item of 'model' \('model.w'\).*the index says it holds a torch.float32 tensor \[\d+, 1024\] at byte \d+, its zip records say it holds (a torch.float32 tensor \[\d+, 1024\] at byte \d+|no plain tensor)"):
        _load(path, dest)


def _flip(path, name, offset):
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _records(path):
    reader = ForgeStorageReader(path)
    reader.read_metadata()
    return reader.records


def _record(path, fqn):
    return next(r for r in _records(path) if r.fqn == fqn)


@pytest.mark.parametrize("where", ["header", "data", "trailer"])
def test_a_flipped_byte_anywhere_in_a_directly_read_blob_is_detected(tmp_path, where):
    saved = _big_state()
    path = _save(tmp_path, saved)
    rec = _record(path, "model.w")
    offset = {"header": rec.offset + 40, "data": rec.offset + rec.length // 2, "trailer": rec.offset + rec.length - 30}
    _flip(path, rec.file, offset[where])
    dest = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in saved.items()}
    with pytest.raises(ValueError, match=rf"checksum mismatch in {rec.file} at byte {rec.offset} for component 'model'"):
        _load(path, dest)


def test_a_truncated_data_file_names_file_and_key(tmp_path):
    saved = _big_state()
    path = _save(tmp_path, saved)
    rec = _record(path, "model.w")
    with open(os.path.join(path, rec.file), "r+b") as f:
        f.truncate(rec.offset + rec.length // 2)
    dest = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in saved.items()}
    with pytest.raises(ValueError, match=rf"{rec.file} is truncated.*'model.w'"):
        _load(path, dest)


def test_plain_dcp_checkpoints_take_the_direct_path_too(tmp_path, direct_reads):
    warnings.simplefilter("ignore")
    saved = {k: v for k, v in _big_state().items() if k != "step"}
    dcp.save({"model": saved}, checkpoint_id=tmp_path / "legacy")  # torch.save blobs, with CRC
    dest = {k: torch.zeros_like(v) for k, v in saved.items()}
    ptr = dest["w"].data_ptr()
    dcp.load({"model": dest}, storage_reader=open_reader(tmp_path / "legacy"), no_dist=True)
    assert all(torch.equal(dest[k], saved[k]) for k in saved) and dest["w"].data_ptr() == ptr
    assert sorted(direct_reads) == ["model.h", "model.w"]


def test_every_item_is_prefetched_before_it_is_read_and_not_too_far_ahead(tmp_path, monkeypatch):
    from dcp_forge.storage import backends, reader

    saved = _big_state()
    path = _save(tmp_path, saved, chunk_bytes=2 * DIRECT_MIN_BYTES)
    events = []
    real_prefetch, real_read = backends._LocalInput.prefetch, backends._LocalInput.read_scatter

    def prefetch(self, offset, length):
        events.append(("prefetch", os.path.basename(self.path), offset, length))
        real_prefetch(self, offset, length)

    def read_scatter(self, offset, views):  # every local read (read_into is one view)
        events.append(("read", os.path.basename(self.path), offset, sum(memoryview(v).nbytes for v in views)))
        real_read(self, offset, views)

    monkeypatch.setattr(backends._LocalInput, "prefetch", prefetch)
    monkeypatch.setattr(backends._LocalInput, "read_scatter", read_scatter)
    monkeypatch.setattr(reader, "PREFETCH_BYTES", 3 * DIRECT_MIN_BYTES)
    dest = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in saved.items()}
    _load(path, dest, thread_count=1)
    assert all(torch.equal(dest[k], saved[k]) for k in ("w", "h", "small"))
    records = ForgeStorageReader(path)
    records.read_metadata()
    starts = {(r.file, r.offset): r for r in records.records}
    prefetched = [(f, o, n) for kind, f, o, n in events if kind == "prefetch"]
    assert len(set(prefetched)) == len(prefetched)  # each range once (small neighbours together)
    for (f, o), r in starts.items():  # every stored item in exactly one prefetched range
        assert len([p for p in prefetched if p[0] == f and p[1] <= o and o + r.length <= p[1] + p[2]]) == 1
    for n, (kind, f, o, length) in enumerate(events):
        if kind == "read":  # the range holding these bytes was prefetched first ...
            assert any(e[0] == "prefetch" and e[1] == f and e[2] <= o and o + length <= e[2] + e[3]
                       for e in events[:n])
    # ... and never more than the window (plus the item being worked on) ahead of the reading
    largest = max(r.length for r in starts.values())
    latest = 0
    for kind, _file, o, _length in events:
        if kind == "read":
            latest = max(latest, o)
        else:
            assert o < latest + 3 * DIRECT_MIN_BYTES + largest


@pytest.mark.parametrize("verify", [True, False])
def test_unverified_loads_prefetch_no_edges_of_recorded_tensors(tmp_path, monkeypatch, verify):
    from dcp_forge.storage import backends

    saved = _big_state()
    path = _save(tmp_path, saved)
    prefetched = []
    monkeypatch.setattr(backends._LocalInput, "prefetch",
                        lambda self, offset, length: prefetched.append((os.path.basename(self.path), offset, length)))
    dest = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in saved.items()}
    _load(path, dest, verify_checksums=verify)
    assert all(torch.equal(dest[k], saved[k]) for k in ("w", "h", "small"))
    records = _records(path)
    recorded = {r.location for r in records if r.data_offset is not None}
    assert recorded and recorded & {(f, o) for f, o, _ in prefetched} == (recorded if verify else set())  # edges: hashed
    for r in records:  # every item read whole was prefetched (small neighbours in one range)
        if r.data_offset is None:
            assert any(f == r.file and o <= r.offset and r.offset + r.length <= o + n for f, o, n in prefetched)


def test_pipelined_checker_waits_for_every_hash_and_raises_the_first_failure():
    from concurrent.futures import ThreadPoolExecutor

    checked = []
    with ThreadPoolExecutor(2) as pool:
        checker = PipelinedChecker(lambda read, found: checked.append((read, found)), pool)
        checker("r0", "abc")  # a direct call checks at once
        assert checked == [("r0", "abc")]
        done = []

        def fail(n):
            def job():
                time.sleep(0.01 * n)
                done.append(n)
                raise IntegrityError(f"bad {n}")
            return job

        for n in (3, 1):
            checker.submit(fail(n))
        checker.submit(lambda: done.append("ok"))
        with pytest.raises(IntegrityError, match="bad 3"):  # first submitted, though it finished last
            checker.wait()
        assert sorted(map(str, done)) == ["1", "3", "ok"]
        checker.wait()  # nothing pending any more
