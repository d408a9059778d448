"""``export_hf`` / ``dcp-forge export-hf``: a checkpoint's model as the safetensors weights
transformers' ``from_pretrained`` loads, bit for bit, from checkpoints saved at any world size."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from dcp_forge import CheckpointCoordinator, IntegrityError, MissingComponentError, ModelState, StateComponent
from dcp_forge.cli import EXIT_ERROR, EXIT_OK, main
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.format.safetensors import INDEX_NAME, WEIGHTS_NAME
from dcp_forge.ops import export_hf as export_module
from dcp_forge.ops.export_hf import export_hf, unwrapped_names
from tests.support.hf import assert_bitwise_equal, from_pretrained, safetensors_state, tiny_llama
from tests.support.statefuls import Box
from tests.support.tamper import data_files, flip_byte

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SHARD = "20KB"  # the tiny Llama (about 94 KB) in 5 shards


def _save(root, stateful, pattern="global", chunk_policy=None, checkpoint_id="checkpoint-1", **options):
    kwargs = {"chunk_policy": chunk_policy} if chunk_policy is not None else {}
    coord = CheckpointCoordinator([StateComponent("model", stateful, pattern)], output_dir=root,
                                  storage_options=options or None, **kwargs)
    return coord.save_checkpoint(checkpoint_id=checkpoint_id)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A tiny Llama saved through ModelState (big tensors cut into row chunks, so the export assembles
    chunks), and the same model written by save_pretrained."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_llama(seed=0)
    path = _save(root / "run", ModelState(model), chunk_policy=ChunkPolicy(4096, 2))
    model.save_pretrained(root / "pretrained", max_shard_size=SHARD)
    return model, path, root


def test_export_writes_the_files_save_pretrained_writes_and_from_pretrained_loads_them(llama_run, tmp_path):
    model, path, root = llama_run
    result = export_hf(path, tmp_path / "hf", max_shard_size=SHARD, config=root / "pretrained" / "config.json",
                       buffer_size="10KB")
    pretrained = root / "pretrained"
    names = sorted(n for n in os.listdir(pretrained) if n.endswith(".safetensors"))
    assert len(names) == 5 and [os.path.basename(f) for f in result.files] == names
    for name in [*names, INDEX_NAME]:  # the same bytes: names, shard cuts, header, tensor order, index
        assert (tmp_path / "hf" / name).read_bytes() == (pretrained / name).read_bytes(), name
        assert stat.S_IMODE(os.stat(tmp_path / "hf" / name).st_mode) == 0o644
    assert result.tensors == len(model.state_dict()) and not result.skipped
    loaded = from_pretrained(tmp_path / "hf")
    assert_bitwise_equal(_weights(loaded), _weights(model), "from_pretrained")


def test_one_shard_is_model_safetensors_without_index(llama_run, tmp_path):
    model, path, _ = llama_run
    result = export_hf(path, tmp_path, config=model.config.to_dict())
    assert sorted(os.listdir(tmp_path)) == ["config.json", WEIGHTS_NAME] and result.index is None
    assert_bitwise_equal(_weights(from_pretrained(tmp_path)), _weights(model))


def test_tied_embeddings_export_both_names_or_one(tmp_path):
    """The checkpoint holds the tied head under its own name too; from_pretrained loads either form."""
    model = tiny_llama(seed=2, tie=True)
    path = _save(tmp_path / "run", ModelState(model))
    export_hf(path, tmp_path / "both", config=model.config.to_dict())
    export_hf(path, tmp_path / "one", config=model.config.to_dict(), exclude=["lm_head.weight"])
    assert "lm_head.weight" in safetensors_state(tmp_path / "both")
    assert "lm_head.weight" not in safetensors_state(tmp_path / "one")
    for name in ("both", "one"):
        loaded = from_pretrained(tmp_path / name)
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert_bitwise_equal(_weights(loaded), _weights(model), name)


def test_dtype_casts_floating_point_tensors(llama_run, tmp_path):
    model, path, _ = llama_run
    export_hf(path, tmp_path, dtype="bf16", max_shard_size=SHARD)
    want = {k: v.to(torch.bfloat16) for k, v in _weights(model).items()}
    assert_bitwise_equal(safetensors_state(tmp_path), want, "bf16 export")


def test_tensors_are_read_a_bounded_batch_at_a_time(llama_run, tmp_path, monkeypatch):
    """Never the whole model: each read asks for at most buffer_size bytes, or for one tensor."""
    model, path, _ = llama_run
    asked: list[list[int]] = []
    real = export_module.read_tensors

    def spy(reader, metadata, fqns):
        values = real(reader, metadata, fqns)
        asked.append([v.nbytes for v in values.values()])
        return values

    monkeypatch.setattr(export_module, "read_tensors", spy)
    limit = 9000
    export_hf(path, tmp_path, buffer_size=limit)
    assert sum(map(len, asked)) == len(model.state_dict())
    assert all(sum(batch) <= limit or len(batch) == 1 for batch in asked)
    assert max(sum(b) for b in asked) < sum(v.nbytes for v in model.state_dict().values()) / 4


def test_a_damaged_checkpoint_is_refused_and_leaves_no_partial_weights(llama_run, tmp_path):
    model = tiny_llama(seed=3)
    path = _save(tmp_path / "run", ModelState(model))
    for name in data_files(path):
        file = os.path.join(path, name)
        flip_byte(file, os.path.getsize(file) // 2)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        export_hf(path, tmp_path / "hf", max_shard_size=SHARD)
    assert not [n for n in os.listdir(tmp_path / "hf") if n.endswith(".safetensors")]
    # Over an earlier export: neither its index nor shards that were half replaced stay behind.
    export_hf(llama_run[1], tmp_path / "hf", max_shard_size=SHARD)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        export_hf(path, tmp_path / "hf", max_shard_size=SHARD, overwrite=True)
    assert not [n for n in os.listdir(tmp_path / "hf") if n.endswith((".safetensors", ".json"))]


def test_existing_weights_are_kept_unless_overwrite_which_removes_stale_shards(llama_run, tmp_path):
    _, path, _ = llama_run
    export_hf(path, tmp_path, max_shard_size=SHARD)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(path, tmp_path)
    export_hf(path, tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [WEIGHTS_NAME]


def test_names_lose_the_component_and_wrapper_prefixes_and_follow_key_map_and_exclude(tmp_path):
    state = {"module._orig_mod.embed.weight": torch.arange(6.0).reshape(2, 3),
             "module._orig_mod.blocks.0._checkpoint_wrapped_module.w": torch.ones(2),
             "module._orig_mod.head.weight": torch.arange(6.0).reshape(2, 3),
             "module._orig_mod.step": 7}
    path = _save(tmp_path / "run", Box(state), pattern="replicated")
    result = export_hf(path, tmp_path / "a")
    assert sorted(safetensors_state(tmp_path / "a")) == ["blocks.0.w", "embed.weight", "head.weight"]
    assert result.skipped == ("model.module._orig_mod.step",)
    export_hf(path, tmp_path / "b", key_map=lambda n: None if n.startswith("blocks") else "model." + n,
              exclude=["*.head.*"])
    assert sorted(safetensors_state(tmp_path / "b")) == ["model.embed.weight"]
    export_hf(path, tmp_path / "c", key_map={"embed.weight": "head.weight"}, exclude=["head.weight"])
    assert sorted(safetensors_state(tmp_path / "c")) == ["blocks.0.w"]
    assert unwrapped_names(["module.a", "b"]) == ["module.a", "b"]  # only a prefix every name has


def test_collisions_missing_components_and_unstorable_dtypes_fail_before_writing(tmp_path):
    path = _save(tmp_path / "run", Box({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.complex128)}),
                 pattern="replicated")
    out = tmp_path / "hf"
    with pytest.raises(ValueError, match="both be exported as 'x'"):
        export_hf(path, out, key_map={"a": "x", "b": "x"})
    with pytest.raises(ValueError, match=r"'model.b'.*complex128.*safetensors cannot store"):
        export_hf(path, out)
    with pytest.raises(MissingComponentError, match=r"no component 'optimizer' \(it holds \['model'\]\)"):
        export_hf(path, out, component="optimizer", exclude=["b"])
    assert not out.exists() or not os.listdir(out)


def test_a_per_rank_model_is_exported_by_naming_its_copy(tmp_path):
    path = _save(tmp_path / "run", Box({"w": torch.arange(4.0)}), pattern="per_rank")
    with pytest.raises(MissingComponentError, match=r"it holds \['model@rank0'\]"):
        export_hf(path, tmp_path / "hf")
    export_hf(path, tmp_path / "hf", component="model@rank0")
    assert torch.equal(safetensors_state(tmp_path / "hf")["w"], torch.arange(4.0))


def test_cli_export_hf(llama_run, tmp_path, capsys):
    model, path, root = llama_run
    code = main(["export-hf", str(path), str(tmp_path / "hf"), "--max-shard-size", SHARD, "--dtype", "fp16",
                 "--config", str(root / "pretrained" / "config.json"), "--buffer-size", "16KB"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert "wrote 3 safetensors file(s)" in out and INDEX_NAME in out  # fp16: half the bytes
    assert all(v.dtype == torch.float16 for v in safetensors_state(tmp_path / "hf").values())
    loaded = from_pretrained(tmp_path / "hf")  # in the config's dtype
    assert_bitwise_equal(_weights(loaded), {k: v.half().float() for k, v in _weights(model).items()})
    assert main(["export-hf", str(path), str(tmp_path / "hf"), "--component", "nope"]) == EXIT_ERROR
    assert "no component 'nope'" in capsys.readouterr().err


# --- sharded saves --------------------------------------------------------------------------------
def _fsdp2_llama_save(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(seed=5)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert type(model.model.embed_tokens.weight).__name__ == "DTensor"
    return _save(root, ModelState(model))


def test_a_two_rank_fsdp2_checkpoint_exports_to_what_from_pretrained_loads(ranks, tmp_path):
    path = ranks(_fsdp2_llama_save, 2, tmp_path / "run")[0]
    export_hf(path, tmp_path / "hf", max_shard_size=SHARD, config=tiny_llama(seed=5).config.to_dict())
    assert_bitwise_equal(_weights(from_pretrained(tmp_path / "hf")), _weights(tiny_llama(seed=5)), "FSDP2 export")


def _tensor_parallel_save(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh

    from dcp_forge.trainers.tiny_lm import TinyLM, TinyLMConfig, apply_tensor_parallel

    model = apply_tensor_parallel(TinyLM(TinyLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2), seed=4),
                                  init_device_mesh("cpu", (world,)))
    return _save(root, ModelState(model))


def test_a_tensor_parallel_checkpoint_exports_whole_tensors(ranks, tmp_path):
    """Row-parallel weights are saved as column blocks, one per rank: the export joins them."""
    from dcp_forge.trainers.tiny_lm import TinyLM, TinyLMConfig

    path = ranks(_tensor_parallel_save, 2, tmp_path / "run")[0]
    export_hf(path, tmp_path / "hf", max_shard_size="8KB")
    reference = TinyLM(TinyLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2), seed=4)
    assert_bitwise_equal(safetensors_state(tmp_path / "hf"), _weights(reference), "TP export")
    assert len(json.loads((tmp_path / "hf" / INDEX_NAME).read_text())["weight_map"]) == len(reference.state_dict())


def test_export_from_and_to_object_storage(s3_url, s3_storage_options, tmp_path):
    model = tiny_llama(seed=6)
    path = _save(s3_url, ModelState(model), **s3_storage_options)
    out = f"{s3_url}-hf"
    result = export_hf(path, out, max_shard_size=SHARD, storage_options=s3_storage_options,
                       out_storage_options=s3_storage_options, config=model.config.to_dict())
    assert len(result.files) == 5 and result.index == f"{out}/{INDEX_NAME}"
    import fsspec

    fs = fsspec.filesystem("s3", **s3_storage_options)
    fs.get(out.removeprefix("s3://") + "/", str(tmp_path / "hf") + "/", recursive=True)
    assert_bitwise_equal(_weights(from_pretrained(tmp_path / "hf")), _weights(model), "S3 export")
