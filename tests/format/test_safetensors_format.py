"""The safetensors format and Hugging Face's shard conventions (format/safetensors.py), checked
against the libraries that define them: safetensors itself and huggingface_hub's shard splitter."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_forge.errors import IntegrityError
from dcp_forge.format.safetensors import (
    TensorSpec,
    box_runs,
    check_file_name,
    decode_header,
    encode_header,
    encode_index,
    header_length,
    parse_size,
    plan_shards,
    shard_file_names,
    tensor_order,
)
from tests.support.strategies import safetensors_states, tensor_boxes


def _file_bytes(state: dict[str, torch.Tensor]) -> bytes:
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    data = b"".join(state[s.name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                    for s in tensor_order(specs))
    return encode_header(specs, {"format": "pt"}) + data


@settings(max_examples=60, deadline=None)
@given(safetensors_states())
def test_files_are_byte_for_byte_what_the_safetensors_library_writes(state):
    from safetensors.torch import load, save

    ours = _file_bytes(state)
    assert ours == save(state, metadata={"format": "pt"})
    loaded = load(ours)
    assert sorted(loaded) == sorted(state)
    for name, value in state.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))


@settings(max_examples=60, deadline=None)
@given(safetensors_states())
def test_decoded_header_places_every_tensor_where_its_bytes_are(state):
    data = _file_bytes(state)
    length = header_length(data[:8], "f")
    metadata, tensors = decode_header(data[8:8 + length], "f", len(data))
    assert metadata == {"format": "pt"}
    assert {t.name for t in tensors} == set(state)
    for t in tensors:
        value = state[t.name]
        assert (t.dtype, t.shape) == (value.dtype, tuple(value.shape))
        assert data[t.begin:t.end] == value.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert t.begin % value.dtype.itemsize == 0  # aligned: torch can view the bytes in place


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=30), st.integers(1, 400))
def test_shards_are_cut_as_huggingface_hub_cuts_them(sizes, limit):
    from huggingface_hub import split_torch_state_dict_into_shards

    # Non-empty tensors: huggingface_hub takes every empty tensor for an alias of the first one.
    state = {f"t{i}": torch.empty(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    theirs = split_torch_state_dict_into_shards(state, max_shard_size=limit,
                                                filename_pattern="model{suffix}.safetensors")
    specs = [TensorSpec(n, torch.uint8, (len(t),)) for n, t in state.items()]
    shards = plan_shards(specs, limit)
    ours = dict(zip(shard_file_names(len(shards)), ([s.name for s in shard] for shard in shards), strict=True))
    assert ours == theirs.filename_to_tensors
    assert sum(s.nbytes for s in specs) == theirs.metadata["total_size"]


@pytest.mark.parametrize("text", ["5GB", "20KB", "1.5MB", "3TB", "7kb", " 10 GB "])
def test_sizes_read_as_huggingface_reads_them(text):
    from huggingface_hub.serialization._base import parse_size_to_int

    assert parse_size(text) == parse_size_to_int(text)


def test_binary_units_and_bad_sizes():
    assert parse_size("4GiB") == 4 * 2**30 and parse_size(512) == 512 and parse_size("100") == 100
    for bad in ("5 parsecs", "", "GB", 0, -1, "0MB", True, 1.5):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_index_is_what_save_pretrained_writes():
    text = encode_index({"b.weight": "model-00002-of-00002.safetensors", "a.weight": "model-00001-of-00002.safetensors"},
                        total_size=96, total_parameters=24)
    assert text.endswith(b"}\n")
    assert json.loads(text) == {"metadata": {"total_parameters": 24, "total_size": 96},
                                "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                               "b.weight": "model-00002-of-00002.safetensors"}}
    assert text.index(b'"a.weight"') < text.index(b'"b.weight"')  # sorted keys, indent 2
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(3)[2] == "model-00003-of-00003.safetensors"


@settings(max_examples=300, deadline=None)
@given(tensor_boxes(), st.sampled_from([1, 2, 4, 8]))
def test_box_runs_hold_exactly_the_box_in_row_major_order(case, itemsize):
    shape, offsets, lengths = case
    whole = np.arange(math.prod(shape) * itemsize, dtype=np.int64).reshape(*shape, itemsize)
    run, starts = box_runs(shape, itemsize, offsets, lengths)
    flat = whole.reshape(-1)
    got = np.concatenate([flat[s:s + run] for s in starts])
    box = whole[tuple(slice(o, o + n) for o, n in zip(offsets, lengths, strict=True))]
    assert np.array_equal(got, box.reshape(-1))
    assert len(starts) * run == math.prod(lengths) * itemsize  # nothing outside the box
    assert all(b > a for a, b in zip(starts[:-1], starts[1:], strict=False))


def test_whole_rows_are_one_run_and_columns_one_run_per_row():
    assert box_runs((8, 4), 2, (2, 0), (3, 4)) == (24, pytest.approx(np.array([16])))
    run, starts = box_runs((8, 4), 2, (0, 1), (8, 2))
    assert run == 4 and starts.tolist() == [2 + 8 * r for r in range(8)]
    assert box_runs((), 4, (), ())[0] == 4
    with pytest.raises(ValueError, match="outside"):
        box_runs((3,), 4, (2,), (2,))


@pytest.mark.parametrize("mangle, message", [
    (lambda h: {**h, "w": {**h["w"], "dtype": "F33"}}, "unreadable header entry"),
    (lambda h: {**h, "w": {**h["w"], "shape": [3]}}, "needs 12 bytes"),
    (lambda h: {**h, "w": {**h["w"], "data_offsets": [4, 20]}}, "starts at byte"),
    (lambda h: [1, 2], "not a JSON object"),
    (lambda h: {**h, "__metadata__": {"format": 3}}, "strings to strings"),
])
def test_malformed_headers_are_refused_with_the_tensor_named(mangle, message):
    header = json.loads(encode_header([TensorSpec("w", torch.float32, (4,))])[8:])
    text = json.dumps(mangle(header)).encode()
    with pytest.raises(IntegrityError, match=message):
        decode_header(text, "weights.safetensors", 8 + len(text) + 16)


def test_lengths_and_file_names_that_would_escape_are_refused():
    with pytest.raises(IntegrityError, match="exceeds"):
        header_length(struct.pack("<Q", 10**12), "f")
    with pytest.raises(IntegrityError, match="8-byte"):
        header_length(b"\x01\x02", "f")
    text = encode_header([TensorSpec("w", torch.float32, (2,))])
    with pytest.raises(IntegrityError, match=f"a file of {len(text) + 8} bytes, the file holds {len(text) + 12}"):
        decode_header(text[8:], "f", len(text) + 12)
    for name in ("../x.safetensors", "a/b.safetensors", "/etc/x.safetensors", "x.bin", 3):
        with pytest.raises(IntegrityError, match="not a safetensors file name"):
            check_file_name(name, "index")
    assert check_file_name("model-00001-of-00002.safetensors", "index")
