"""Small tensors and values are stored in packs (format/pack.py): a few hundred bytes of records per item
instead of a zip each, read back exactly by dcp_forge and by plain DCP (``dcp.load`` into a model's
state dict, ``format_utils.dcp_to_torch_save``), every item's damage caught on its own."""

from __future__ import annotations

import dataclasses
import math
import os
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dcp_forge import CheckpointCoordinator, IntegrityError, StateComponent, verify_checkpoint
from dcp_forge.core.tensors import dtype_named
from dcp_forge.format.index import own_pieces
from dcp_forge.format.pack import SMALL_ITEM_BYTES
from dcp_forge.format.safe_load import load_dcp_metadata
from dcp_forge.ops.verify import ProblemKind
from dcp_forge.storage import ForgeStorageReader
from tests.support.local_reads import record_local_reads
from tests.support.statefuls import Box
from tests.support.tamper import data_files, edit_index, flip_byte

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Model(torch.nn.Module):
    """Many small parameters (norms, biases) beside one larger weight, like a real model's."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(16) for _ in range(40))
        self.proj = torch.nn.Linear(128, 256)


def _trained(seed: int) -> tuple[_Model, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _Model()
    for norm in model.norms:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = sum(n.weight.sum() * n.bias.sum() for n in model.norms) + model.proj.weight.square().sum()
    loss.backward()
    optimizer.step()
    return model, optimizer


def _save(root, seed: int = 0) -> tuple[str, _Model, torch.optim.Optimizer]:
    model, optimizer = _trained(seed)
    extra = Box({"step": 7, "name": "run", "lrs": [0.1, 0.01], "table": torch.arange(5)})
    path = CheckpointCoordinator([StateComponent("model", model, "replicated"),
                                  StateComponent("optimizer", optimizer, "replicated"),
                                  StateComponent("extra", extra, "global")], output_dir=root).save_checkpoint(
        checkpoint_id="c")
    return path, model, optimizer


def _records(path):
    reader = ForgeStorageReader(path)
    reader.read_metadata()
    return reader.records


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("packing"))


def test_small_items_share_packs_of_few_bytes_each(saved):
    path, model, _ = saved
    records = _records(path)
    big = [r for r in records if r.kind == "tensor"
           and math.prod(r.chunk_sizes) * dtype_named(r.dtype).itemsize > SMALL_ITEM_BYTES]
    assert sorted(r.fqn for r in big) == ["model.proj.weight", "optimizer.state.80.exp_avg",
                                          "optimizer.state.80.exp_avg_sq"]
    assert all(r.gap_offset is not None for r in records), [r.fqn for r in records if r.gap_offset is None]
    data = sum(os.path.getsize(os.path.join(path, name)) for name in data_files(path))
    payload = sum(v.nbytes for v in model.state_dict().values())
    # a zip each was ~1.5 KB of records per item; optimizer state is about twice the model's payload
    assert data < 3 * payload + 500 * len(records)
    assert data == sum(r.stored_bytes for r in records)  # every byte owned by exactly one item


def test_plain_dcp_loads_packed_items_into_a_models_state_dict(saved):
    path, model, _ = saved
    fresh = _Model()
    state = {"model": fresh.state_dict()}
    dcp.load(state, checkpoint_id=path)  # DCP's own FileSystemReader: torch.load of each item's range
    fresh.load_state_dict(state["model"])
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_dcp_to_torch_save_converts_a_packed_checkpoint(saved, tmp_path):
    path, model, optimizer = saved
    dcp_to_torch_save(path, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    for name, value in model.state_dict().items():
        assert torch.equal(whole["model"][name], value), name
    assert whole["extra"]["step"] == 7 and whole["extra"]["lrs"] == [0.1, 0.01]
    assert torch.equal(whole["extra"]["table"], torch.arange(5))
    stored_steps = [s["step"] for s in whole["optimizer"]["state"].values()]
    assert stored_steps and all(torch.equal(s, torch.tensor(1.0)) for s in stored_steps)


def test_dcp_forge_loads_packed_items_exactly_and_verify_is_clean(saved, tmp_path):
    path, model, optimizer = saved
    assert verify_checkpoint(path) == []
    fresh_model, fresh_optimizer = _trained(5)
    extra = Box({"step": 0, "name": "", "lrs": [0.0, 0.0], "table": torch.zeros(5, dtype=torch.int64)})
    CheckpointCoordinator([StateComponent("model", fresh_model, "replicated"),
                           StateComponent("optimizer", fresh_optimizer, "replicated"),
                           StateComponent("extra", extra, "global")], output_dir=tmp_path).load_checkpoint(path)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], value), name
    for (_, got), (_, want) in zip(fresh_optimizer.state_dict()["state"].items(),
                                   optimizer.state_dict()["state"].items(), strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert extra.state_dict() == {"step": 7, "name": "run", "lrs": [0.1, 0.01], "table": extra.state_dict()["table"]}
    assert torch.equal(extra.state_dict()["table"], torch.arange(5))


def test_large_packed_tensors_are_read_into_place_with_their_trailers_in_one_read(saved, tmp_path, monkeypatch):
    path, model, _ = saved
    calls = record_local_reads(monkeypatch)
    fresh, _ = _trained(5)
    weight = fresh.proj.weight
    CheckpointCoordinator([StateComponent("model", fresh, "replicated")], output_dir=tmp_path).load_checkpoint(
        path, strict=False)
    assert fresh.proj.weight.data_ptr() == weight.data_ptr() and torch.equal(fresh.proj.weight, model.proj.weight)
    row = _packed(path, "model.proj.weight")
    assert (row.file, row.offset + row.data_offset, [model.proj.weight.nbytes]) in calls  # straight into place


def test_loading_some_items_of_a_pack_reads_them_alone(saved, tmp_path):
    path, model, _ = saved
    fresh, _ = _trained(5)
    CheckpointCoordinator([StateComponent("model", fresh, "replicated")], output_dir=tmp_path).load_checkpoint(
        path, strict=False)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def _packed(path, fqn):
    return next(r for r in _records(path) if r.fqn == fqn)


def test_a_damaged_packed_item_is_refused_and_named_alone(tmp_path):
    path, _, _ = _save(tmp_path)
    row = _packed(path, "model.norms.3.weight")
    flip_byte(os.path.join(path, row.file), row.offset + row.data_offset + 5)  # inside the tensor's bytes
    problems = verify_checkpoint(path)
    assert [(p.kind, "model.norms.3.weight" in p.message) for p in problems] == [(ProblemKind.CHECKSUM_MISMATCH, True)]
    fresh, _ = _trained(5)
    with pytest.raises(IntegrityError, match=r"checksum mismatch .*model.norms.3.weight"):
        CheckpointCoordinator([StateComponent("model", fresh, "replicated")], output_dir=tmp_path).load_checkpoint(
            path, strict=False)


def test_a_damaged_trailer_is_its_own_items_fault(tmp_path):
    path, _, _ = _save(tmp_path)
    row = _packed(path, "model.norms.7.bias")
    (_, _), (tail_at, tail_length) = own_pieces(row.length, row.gap_offset, row.gap_length)
    flip_byte(os.path.join(path, row.file), row.offset + tail_at + tail_length // 2)
    problems = verify_checkpoint(path)
    assert len(problems) == 1 and "model.norms.7.bias" in problems[0].message


def test_a_damaged_shared_data_pkl_is_its_carriers_fault_and_named_for_each_tensor_naming_it(tmp_path):
    """Tensors of one dtype and shape in a pack share one data.pkl record, in the first one's trailer:
    damaged, that item fails its checksum, and verify names every other tensor plain DCP could no longer
    read; dcp_forge still loads those exactly (it reads their bytes, not the record)."""
    path, model, _ = _save(tmp_path)
    rows = [r for r in _records(path) if r.gap_offset is not None]

    def trailer_at(row) -> int:
        return row.offset + own_pieces(row.length, row.gap_offset, row.gap_length)[1][0]

    def trailer(row) -> bytes:
        with open(os.path.join(path, row.file), "rb") as f:
            f.seek(trailer_at(row))
            return f.read(row.offset + row.length - trailer_at(row))

    carrier = next(r for r in rows if r.fqn == "model.norms.0.weight")
    assert b"_rebuild_tensor" in trailer(carrier)  # the first (16,) float32 tensor of its pack
    record_at = trailer_at(carrier) + trailer(carrier).index(b"_rebuild_tensor")
    naming = {r.fqn for r in rows if r is not carrier and (r.file, r.dtype, r.shape) == (carrier.file, carrier.dtype,
              carrier.shape) and r.offset < record_at < trailer_at(r)}
    assert {f"model.norms.{i}.{p}" for i in range(40) for p in ("weight", "bias")} - {carrier.fqn} <= naming
    flip_byte(os.path.join(path, carrier.file), record_at)
    problems = verify_checkpoint(path)
    assert [p.kind for p in problems if f"'{carrier.fqn}'" in p.message] == [ProblemKind.CHECKSUM_MISMATCH]
    named = {re.search(r"packed item of '([^']+)'", p.message).group(1)
             for p in problems if p.kind == ProblemKind.WRONG_LAYOUT and "names the data.pkl record" in p.message}
    assert named == naming and len(problems) == len(naming) + 1
    others = {"model": {name: torch.zeros(16) for name in model.state_dict()
                        if name.startswith("norms.") and f"model.{name}" in naming}}  # all but the carrier
    dcp.load(others, storage_reader=ForgeStorageReader(path), no_dist=True)
    assert len(others["model"]) == 2 * 40 - 1  # every norm weight and bias but the carrier
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in others["model"].items())


@pytest.mark.parametrize("field, delta", [("gap_offset", 4), ("gap_length", -4), ("data_offset", 4)])
def test_a_resealed_row_that_moves_a_packed_item_is_refused(tmp_path, field, delta):
    """The checksums agree (re-sealed), but the item's zip records say where it is, and they disagree."""
    path, _, _ = _save(tmp_path)
    fqn = "model.norms.2.weight"
    edit_index(path, lambda rows: [dataclasses.replace(r, **{field: getattr(r, field) + delta}) if r.fqn == fqn else r
                                   for r in rows])
    problems = verify_checkpoint(path)
    assert problems and all(fqn in p.message for p in problems), problems
    fresh, _ = _trained(5)
    with pytest.raises(IntegrityError, match=fqn):
        CheckpointCoordinator([StateComponent("model", fresh, "replicated")], output_dir=tmp_path).load_checkpoint(
            path, strict=False)


def test_metadata_is_written_with_its_equal_parts_shared(saved):
    """pickle writes an object once however often it appears: the writer makes equal parts one object
    (format/dcp_metadata.py), and the checkpoint above still loads with plain DCP and dcp_to_torch_save."""
    path, _, _ = saved
    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = load_dcp_metadata(f.read(), name="test")
    tensors = [md for md in metadata.state_dict_metadata.values() if isinstance(md, TensorStorageMetadata)]
    assert len({id(md.properties) for md in tensors}) == len({repr(md.properties) for md in tensors})
    sizes = [size for md in tensors for size in (md.size, *(c for chunk in md.chunks for c in (chunk.offsets,
                                                                                               chunk.sizes)))]
    assert len({id(size) for size in sizes}) == len({tuple(size) for size in sizes})
    keys = {fqn: fqn for fqn in metadata.state_dict_metadata}
    assert all(index.fqn is keys[index.fqn] for index in metadata.storage_data)
    assert all(fqn is keys[fqn] for fqn in metadata.planner_data)
    assert len({id(info.relative_path) for info in metadata.storage_data.values()}) == len(data_files(path))
