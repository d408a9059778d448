"""The private torch APIs dcp_forge uses (dcp_forge/_torch_compat.py) exist with the signatures it calls
them with, and every by-hand fallback does what the torch version does.

When a torch upgrade fails a test here, read the new torch's code for that name and update
_torch_compat.py (the fallback keeps dcp_forge working meanwhile, possibly slower).
"""

from __future__ import annotations

import inspect
import io

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Replicate, Shard

from dcp_forge import _torch_compat as compat


def test_this_torch_is_the_release_the_private_names_were_checked_against():
    assert torch.__version__.startswith(compat.CHECKED_TORCH), (
        f"torch {torch.__version__}: re-check every name in dcp_forge/_torch_compat.py, then update CHECKED_TORCH")


@pytest.mark.parametrize("module, name, parameters", [
    ("torch.distributed.checkpoint._traverse", "set_element", ["root_dict", "path", "value"]),
    ("torch.distributed.checkpoint._nested_dict", "flatten_state_dict", ["state_dict"]),
    ("torch.utils._pytree", "tree_leaves", ["tree", "is_leaf"]),
    ("torch.serialization", "_save", ["obj", "zip_file", "pickle_module", "pickle_protocol",
                                      "_disable_byteorder_record"]),
    ("torch.serialization", "_get_storage_alignment", []),
    ("torch.distributed.tensor._utils", "compute_local_shape_and_global_offset", ["global_shape", "mesh", "placements"]),
])
def test_private_functions_exist_with_the_signatures_we_call(module, name, parameters):
    function = getattr(__import__(module, fromlist=[name]), name)
    assert list(inspect.signature(function).parameters)[:len(parameters)] == parameters


def test_private_classes_exist_as_we_use_them():
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    assert compat.StorageInfo is _StorageInfo
    assert list(_StorageInfo.__dataclass_fields__)[:3] == ["relative_path", "offset", "length"]
    assert compat.fsspec_reader_class() is FsspecReader
    assert "compute_crc32" in torch._C.PyTorchFileWriter.__init__.__doc__
    assert compat._write_without_crc is not None, "torch's zip writer entry points changed: saves now run the CRC"
    assert "_init_backend" in inspect.signature(torch.distributed.device_mesh.DeviceMesh.__init__).parameters


def test_the_default_group_s_timeout_is_read_where_we_read_it():
    # read for real on gloo ranks by tests/coordinator/test_collective_timeout_dist.py
    from torch._C._distributed_c10d import Backend, ProcessGroup

    assert hasattr(ProcessGroup, "_device_types") and hasattr(ProcessGroup, "_get_backend")
    assert hasattr(Backend.Options, "_timeout")
    assert callable(torch.distributed.distributed_c10d._get_default_group)
    assert compat.default_group_timeout() is None, "no process group in this process: nothing to follow"


def _nested():
    return {"model": {"w": torch.arange(3.0), "blocks": [torch.ones(2), {"b": torch.zeros(1)}]},
            "step": 7, "empty": {}, "names": ["a", "b"]}


def test_flattening_by_hand_matches_dcp():
    assert compat._flatten_by_hand(_nested())[1] == compat.flatten_state_dict(_nested())[1]


def test_set_element_by_hand_matches_dcp():
    _, paths = compat.flatten_state_dict(_nested())
    ours, theirs = {}, {}
    for key, path in paths.items():
        compat._set_element_by_hand(ours, path, key)
        compat.set_element(theirs, path, key)
    assert ours == theirs


def test_set_element_by_hand_refuses_a_name_that_addresses_a_list():
    root = {"a": [{"b": 1}]}
    with pytest.raises(TypeError, match=r"\('a', 'x', 'b'\): the key 'x' addresses a list"):
        compat._set_element_by_hand(root, ("a", "x", "b"), 2)


def test_tree_leaves_by_hand_matches_torch():
    tree = {"a": [1, (2, 3)], "b": {"c": torch.ones(1)}}
    assert [id(x) for x in compat._leaves_by_hand(tree)] == [id(x) for x in compat.tree_leaves(tree)]


def test_local_shard_shape_by_hand_matches_dtensor():
    for mesh_shape, placements, rank in [((4,), (Shard(0),), 3), ((2, 2), (Shard(0), Shard(1)), 1),
                                         ((2, 2), (Shard(0), Shard(0)), 3), ((3,), (Replicate(),), 2),
                                         ((4,), (Shard(0),), 3)]:
        mesh = compat.simulated_device_mesh(mesh_shape, rank)
        for shape in [(10, 7), (3, 5), (1, 1)]:
            expected = compat.local_shard_shape(shape, mesh, placements)
            assert compat._local_shape_by_hand(shape, mesh, placements) == expected, (shape, placements, rank)


def test_crc_free_blob_loads_like_a_torch_save(tmp_path):
    tensor = torch.randn(4, 5)
    ours, theirs = io.BytesIO(), io.BytesIO()
    compat.save_tensor_without_crc(tensor, ours)
    torch.save(tensor, theirs)
    assert len(ours.getvalue()) == len(theirs.getvalue())
    assert torch.equal(torch.load(io.BytesIO(ours.getvalue()), weights_only=True), tensor)


def test_empty_state_dict_planner_rebuilds_what_dcp_format_utils_does(tmp_path):
    import warnings

    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    warnings.simplefilter("ignore")
    dcp.save(_nested(), checkpoint_id=str(tmp_path), no_dist=True)
    ours, theirs = compat.EmptyStateDictLoadPlanner(), _EmptyStateDictLoadPlanner()
    for planner in (ours, theirs):
        dcp.load({}, checkpoint_id=str(tmp_path), planner=planner, no_dist=True)
    mine, torchs = (compat.flatten_state_dict(p.original_state_dict)[0] for p in (ours, theirs))
    assert mine.keys() == torchs.keys() == compat.flatten_state_dict(_nested())[0].keys()
    for key, value in mine.items():
        assert torch.equal(value, torchs[key]) if isinstance(value, torch.Tensor) else value == torchs[key]


def test_only_dcps_single_process_warning_is_silenced_and_only_around_our_calls(tmp_path):
    import re
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcp.save({"x": torch.ones(2)}, checkpoint_id=str(tmp_path / "theirs"), no_dist=True)  # a user's own call
        with compat.single_process_dcp():
            dcp.save({"x": torch.ones(2)}, checkpoint_id=str(tmp_path / "ours"), no_dist=True)
            dcp.load({"x": torch.zeros(2)}, checkpoint_id=str(tmp_path / "ours"), no_dist=True)
            warnings.warn("any other warning", stacklevel=1)
        with compat.single_process_dcp(no_dist=False):
            dcp.load({"x": torch.zeros(2)}, checkpoint_id=str(tmp_path / "ours"), no_dist=True)
    messages = [str(w.message) for w in caught]
    single = [m for m in messages if re.search(compat.SINGLE_PROCESS_WARNING, m)]
    assert len(single) == 2, "torch's text still matches, and it is silenced only where dcp_forge asks"
    assert "any other warning" in messages


def test_dcps_state_dict_stager_has_the_hooks_a_deferred_copy_overrides():
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager

    assert compat.DeferredCopyStager is not None, "overlapped staging now falls back to copying at the call"
    assert list(inspect.signature(StateDictStager._stage_untyped_storage).parameters) == [
        "self", "storage", "non_blocking"]
    assert list(inspect.signature(StateDictStager._offload_tensor).parameters) == [
        "self", "x", "memo", "non_blocking"]
    # the deep copy's undecorated recursion (its no_grad entered once, by stage)
    assert list(inspect.signature(StateDictStager.deepcopy_with_tensor_offload.__wrapped__).parameters) == [
        "self", "x", "memo", "_nil", "non_blocking"]
    assert compat.DeferredCopyStager.deepcopy_with_tensor_offload is (
        StateDictStager.deepcopy_with_tensor_offload.__wrapped__)


def test_a_deferred_copy_stages_views_on_one_buffer_filled_later():
    stager = compat.DeferredCopyStager(torch.UntypedStorage)
    big, small = torch.arange(1000.0), torch.arange(3.0)
    state = {"big": big, "tail": big[990:], "small": small, "meta": [1, {"x": "y"}]}
    staged = stager.stage_deferring(state, defer_min_bytes=4000)
    assert [(source.nbytes(), buffer.nbytes()) for source, buffer in stager.deferred] == [(4000, 4000)]
    assert [t.shape for t, _ in stager.watched] == [torch.Size([1000]), torch.Size([10])]
    assert torch.equal(staged["small"], small) and staged["meta"] == [1, {"x": "y"}]
    for source, buffer in stager.deferred:
        buffer.copy_(source)
    assert torch.equal(staged["big"], big) and torch.equal(staged["tail"], big[990:])
    assert staged["tail"].untyped_storage().data_ptr() == staged["big"].untyped_storage().data_ptr()
    again = stager.stage_deferring(state, defer_min_bytes=None)  # the buffers are reused, copied now
    assert again["big"].untyped_storage().data_ptr() == staged["big"].untyped_storage().data_ptr()
    assert stager.deferred == [] and stager.buffer_count() == 2


def test_version_counters_see_in_place_changes_through_state_dict_aliases():
    """What the overlapped staging's mutation check relies on: a state_dict() tensor (detached) shares
    its parameter's version counter, and an optimizer step (foreach kernels) advances it."""
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    weight = model.state_dict()["weight"]
    before = compat.tensor_version(weight)
    assert isinstance(before, int)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert compat.tensor_version(weight) > before
    moment = opt.state_dict()["state"][0]["exp_avg"]
    before = compat.tensor_version(moment)
    opt.step()
    assert compat.tensor_version(moment) > before
    before = compat.tensor_version(weight)
    with torch.no_grad():
        model.weight[0].mul_(2)  # through a view of the parameter
    assert compat.tensor_version(weight) > before
