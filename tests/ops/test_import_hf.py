"""``load_hf_into``: Hugging Face safetensors weights into plain, FSDP2 and tensor-parallel models,
bit for bit, each rank reading only the boxes its shards need (``SafetensorsReader``)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from dcp_forge import (
    IntegrityError,
    MissingComponentError,
    ModelState,
    StateMismatchError,
    UnexpectedComponentError,
    load_hf_into,
)
from dcp_forge.format.safetensors import INDEX_NAME
from dcp_forge.ops.export_hf import export_hf
from dcp_forge.ops.import_hf import lossless_cast
from dcp_forge.storage import SafetensorsReader
from dcp_forge.trainers.tiny_lm import TinyLM, TinyLMConfig
from tests.support.hf import assert_bitwise_equal, safetensors_state, tiny_llama
from tests.support.strategies import tensor_boxes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
# Big enough that every rank's box is a fraction of each weight: 256 KiB embedding and head.
TINY = TinyLMConfig(vocab_size=1024, d_model=64, n_layers=2, n_heads=2)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny Llama as save_pretrained writes it, in 5 shards."""
    root = tmp_path_factory.mktemp("pretrained")
    model = tiny_llama(seed=0)
    model.save_pretrained(root, max_shard_size="20KB")
    return model, root


def test_weights_load_bit_for_bit_and_the_rest_is_left_alone(pretrained):
    model, root = pretrained
    fresh = tiny_llama(seed=9)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    result = load_hf_into(fresh, root)
    assert_bitwise_equal(_weights(fresh), _weights(model))
    assert result.loaded == tuple(sorted(model.state_dict())) and not (result.missing or result.unexpected)
    assert result.read.bytes_read == sum(v.nbytes for v in model.state_dict().values())
    assert not optimizer.state  # only the model is touched


def test_a_single_process_load_does_not_warn_that_it_is_single_process(pretrained):
    import warnings

    _, root = pretrained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_hf_into(tiny_llama(seed=9), root)
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]


def test_tied_embeddings_load_from_weights_that_hold_them_once(tmp_path):
    model = tiny_llama(seed=1, tie=True)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in safetensors_state(tmp_path)
    fresh = tiny_llama(seed=2, tie=True)
    result = load_hf_into(ModelState(fresh), tmp_path)
    assert result.tied == ("lm_head.weight",) and not result.missing
    assert_bitwise_equal(_weights(fresh), _weights(model))


def test_missing_and_unexpected_weights_are_errors_unless_not_strict(pretrained, tmp_path):
    model, root = pretrained
    bigger = tiny_llama(seed=3, num_hidden_layers=3)
    with pytest.raises(MissingComponentError, match=r"no weight for 9 model key\(s\): \['model.layers.2"):
        load_hf_into(bigger, root)
    before = _weights(bigger)
    result = load_hf_into(bigger, root, strict=False)
    assert len(result.missing) == 9 and all(k.startswith("model.layers.2.") for k in result.missing)
    after = _weights(bigger)
    for key in after:
        assert torch.equal(after[key], before[key] if key in result.missing else model.state_dict()[key])
    smaller = tiny_llama(seed=3, num_hidden_layers=1)
    with pytest.raises(UnexpectedComponentError, match=r"9 weight\(s\) with no model key"):
        load_hf_into(smaller, root)
    assert len(load_hf_into(smaller, root, strict=False).unexpected) == 9


def test_key_map_renames_weights_to_model_keys(pretrained):
    """A model whose keys differ from the weights' (here: no ``model.`` prefix, head renamed)."""
    model, root = pretrained
    inner = tiny_llama(seed=4).model  # LlamaModel: keys without "model.", and no lm_head
    result = load_hf_into(inner, root, key_map=lambda n: None if n == "lm_head.weight" else n.removeprefix("model."))
    assert_bitwise_equal(_weights(inner), {k.removeprefix("model."): v for k, v in _weights(model).items()
                                           if k != "lm_head.weight"})
    assert not result.unexpected


def test_shapes_must_match_and_only_lossless_casts_are_implicit(pretrained, tmp_path):
    model, root = pretrained
    with pytest.raises(StateMismatchError, match=r"'model.embed_tokens.weight' has shape \[96, 32\], model key "
                                                 r"'model.embed_tokens.weight' expects \[100, 32\]"):
        load_hf_into(tiny_llama(seed=5, vocab_size=100), root, strict=False)
    half = tiny_llama(seed=5).to(torch.bfloat16)
    with pytest.raises(StateMismatchError, match="would lose information"):
        load_hf_into(half, root)
    load_hf_into(half, root, allow_cast=True)
    assert_bitwise_equal(_weights(half), {k: v.to(torch.bfloat16) for k, v in _weights(model).items()})
    # bf16 weights into an fp32 model: exact, so allowed
    half.save_pretrained(tmp_path)
    full = tiny_llama(seed=6)
    load_hf_into(full, tmp_path)
    assert_bitwise_equal(_weights(full), {k: v.float() for k, v in _weights(half).items()})
    assert lossless_cast(torch.int8, torch.int32) and not lossless_cast(torch.float16, torch.bfloat16)
    assert not lossless_cast(torch.int32, torch.float32) and not lossless_cast(torch.bool, torch.uint8)


def test_one_file_and_broken_directories(pretrained, tmp_path):
    model, root = pretrained
    single = tmp_path / "single"
    model.save_pretrained(single)
    fresh = tiny_llama(seed=7)
    load_hf_into(fresh, single / "model.safetensors")
    assert_bitwise_equal(_weights(fresh), _weights(model))

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(root):
        (broken / name).write_bytes((root / name).read_bytes())
    index = json.loads((broken / INDEX_NAME).read_text())
    index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    (broken / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(IntegrityError, match="not a safetensors file name inside the directory"):
        load_hf_into(fresh, broken)
    index["weight_map"]["lm_head.weight"] = "model-00005-of-00005.safetensors"
    index["weight_map"]["model.embed_tokens.weight"] = "model-00002-of-00005.safetensors"
    (broken / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(IntegrityError, match="which model.safetensors.index.json assigns to"):
        load_hf_into(fresh, broken)
    (broken / INDEX_NAME).write_text((root / INDEX_NAME).read_text())
    last = broken / "model-00005-of-00005.safetensors"
    last.write_bytes(last.read_bytes()[:-4])
    with pytest.raises(IntegrityError, match="the file holds"):
        load_hf_into(fresh, broken)
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        load_hf_into(fresh, tmp_path / "empty")


def test_a_hub_cache_snapshot_of_symbolic_links_loads(pretrained, tmp_path):
    """The Hub cache keeps files as blobs and a snapshot directory of links to them."""
    model, root = pretrained
    (tmp_path / "blobs").mkdir()
    (tmp_path / "snapshot").mkdir()
    for name in os.listdir(root):
        (tmp_path / "blobs" / name).write_bytes((root / name).read_bytes())
        (tmp_path / "snapshot" / name).symlink_to(f"../blobs/{name}")
    fresh = tiny_llama(seed=8)
    load_hf_into(fresh, tmp_path / "snapshot")
    assert_bitwise_equal(_weights(fresh), _weights(model))
    load_hf_into(tiny_llama(seed=8), tmp_path / "snapshot" / "model-00001-of-00005.safetensors", strict=False)


@settings(max_examples=80, deadline=None)
@given(tensor_boxes(max_dims=3, max_extent=7), st.sampled_from([0, 4, 64, 1 << 20]), st.sampled_from([8, 40, 1 << 20]),
       st.sampled_from([torch.float32, torch.bfloat16, torch.int64]))
def test_a_box_reads_exactly_its_elements_whatever_the_gaps(tmp_path_factory, case, max_gap, max_span, dtype):
    """What a shard asks for, read straight into it or through bounded span buffers."""
    from safetensors.torch import save_file

    shape, offsets, lengths = case
    directory = tmp_path_factory.mktemp("box")
    whole = torch.arange(1, 1 + torch.Size(shape).numel()).reshape(shape).to(dtype)
    save_file({"pad": torch.zeros(3, dtype=torch.int8), "w": whole}, directory / "model.safetensors")
    reader = SafetensorsReader(directory, max_gap_bytes=max_gap, max_span_bytes=max_span)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    box = torch.full(lengths, -1).to(dtype)

    class Planner:  # the destination is the box itself, as a shard's local tensor is
        def resolve_tensor(self, item):
            return box

        def commit_tensor(self, item, tensor):
            pass

    item = ReadItem(LoadItemType.TENSOR, MetadataIndex("w"), torch.Size([0] * len(shape)),
                    MetadataIndex("w", [0] * len(shape)), torch.Size(offsets), torch.Size(lengths))
    reader.read_data(LoadPlan([item]), Planner()).wait()
    want = whole[tuple(slice(o, o + n) for o, n in zip(offsets, lengths, strict=True))]
    assert torch.equal(box, want)
    read = reader.stats
    if max_gap == 0:
        assert read.bytes_read == want.nbytes and read.largest_buffer == 0
    assert read.largest_buffer <= max(max_span, 0) or read.largest_buffer == 0
    assert read.bytes_read <= whole.nbytes


# --- sharded models ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm_export(tmp_path_factory):
    """TinyLM saved by dcp_forge and exported (2 shards): the weights the sharded loads start from."""
    from dcp_forge import CheckpointCoordinator, StateComponent

    root = tmp_path_factory.mktemp("tiny")
    model = TinyLM(TINY, seed=0)
    path = CheckpointCoordinator([StateComponent("model", ModelState(model), "global")],
                                 output_dir=root / "run").save_checkpoint(checkpoint_id="c")
    export_hf(path, root / "hf", max_shard_size="600KB")
    assert (root / "hf" / INDEX_NAME).exists()
    return _weights(model), root / "hf"


def _load_sharded(rank, world, hf_dir, kind):
    from torch.distributed.device_mesh import init_device_mesh

    from dcp_forge.trainers.tiny_lm import apply_fsdp2, apply_tensor_parallel

    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):  # never whole on any rank: sharded first, then given (local) memory
        model = TinyLM(TINY, seed=1)
    (apply_fsdp2 if kind == "fsdp" else apply_tensor_parallel)(model, mesh)
    model.to_empty(device="cpu")
    result = load_hf_into(model, hf_dir)
    state = model.state_dict()
    local = {k: v.to_local().nbytes if hasattr(v, "to_local") else v.nbytes for k, v in state.items()}
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    sharded = {k for k, v in state.items() if any(p.is_shard() for p in getattr(v, "placements", ()))}
    return full, local, sharded, result.read


@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_sharded_models_load_exactly_their_own_boxes(ranks, tiny_lm_export, kind):
    want, hf_dir = tiny_lm_export
    results = ranks(_load_sharded, 2, hf_dir, kind)
    for full, local, sharded, read in results:
        assert_bitwise_equal(full, want, kind)
        assert sharded, kind
        # Each rank read exactly the bytes of its own shards (and every replicated weight whole), and
        # never held a buffer: every box went straight into the rank's local tensor.
        assert dict(read.bytes_by_name) == local
        assert read.largest_buffer == 0
        for key in sharded:
            assert local[key] < want[key].nbytes, key
    for key in results[0][2]:  # the shards of each sharded weight add up to it, nothing read twice
        assert sum(r[3].bytes_by_name[key] for r in results) == want[key].nbytes


def test_loading_from_object_storage_reads_gaps_through_in_bounded_spans(s3_url, s3_storage_options, tiny_lm_export):
    """One request per span on object stores; a column block of the head still reads correctly."""
    import fsspec

    want, hf_dir = tiny_lm_export
    fs = fsspec.filesystem("s3", **s3_storage_options)
    fs.put(str(hf_dir) + "/", s3_url.removeprefix("s3://") + "/", recursive=True)
    fresh = TinyLM(TINY, seed=2)
    result = load_hf_into(fresh, s3_url, storage_options=s3_storage_options)
    assert_bitwise_equal(_weights(fresh), want, "from S3")
    assert result.read.bytes_read == sum(v.nbytes for v in want.values())

    reader = SafetensorsReader(s3_url, s3_storage_options, max_span_bytes=64 * 1024)
    reader.set_up_storage_reader(reader.read_metadata(), True)
    head = want["lm_head.weight"]  # 1024 x 64 fp32: rows of 256 bytes
    box = torch.empty(1024, 16)

    class Planner:
        def resolve_tensor(self, item):
            return box

        def commit_tensor(self, item, tensor):
            pass

    item = ReadItem(LoadItemType.TENSOR, MetadataIndex("lm_head.weight"), torch.Size([0, 0]),
                    MetadataIndex("lm_head.weight", [0, 0]), torch.Size([0, 8]), torch.Size([1024, 16]))
    reader.read_data(LoadPlan([item]), Planner()).wait()
    assert torch.equal(box, head[:, 8:24])
    assert reader.stats.largest_buffer <= 64 * 1024 < head.nbytes
