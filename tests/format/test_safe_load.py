"""Loading untrusted checkpoints: pickled code never runs (bytes items and .metadata, with every
checksum resealed so only the safe loaders stand in the way), stored paths cannot leave the
checkpoint directory, and credentials never reach storage, logs or error messages."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException

from dcp_forge import (
    CheckpointCoordinator,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ComponentDeclarationError,
    IntegrityError,
    ProblemKind,
    StateComponent,
    verify_checkpoint,
)
from dcp_forge.format.safe_load import UnsafeCheckpointError
from dcp_forge.storage import open_reader, redact_url
from tests.support.statefuls import Box
from tests.support.tamper import read_metadata, replace_item_bytes, reseal, write_metadata

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")




class CreatesFile:
    """Unpickling this runs ``open(path, "w")``: proof that code from the checkpoint ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _state() -> dict:
    return {"weights": torch.arange(12.0).reshape(3, 4), "config": {"name": "run", "layers": [1, 2]}, "step": 3}


def _coordinator(root, state=None, **kwargs) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("box", Box(state if state is not None else _state()), "global")],
                                 output_dir=root, **kwargs)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield str(path)
    assert not path.exists(), "pickled code from the checkpoint was executed"


def _payload(marker: str) -> bytes:
    buffer = io.BytesIO()
    torch.save(CreatesFile(marker), buffer)  # exactly how DCP stores a non-tensor value
    data = buffer.getvalue()
    torch.load(io.BytesIO(data), weights_only=False)  # the payload is live: a full unpickler runs it ...
    assert os.path.exists(marker)
    os.remove(marker)  # ... which the rest of the test must never do
    return data


@pytest.mark.parametrize("verify_checksums", [True, False])
def test_malicious_pickle_in_a_bytes_item_is_refused(tmp_path, marker, verify_checksums):
    path = _coordinator(tmp_path / "run").save_checkpoint(checkpoint_id="c")
    replace_item_bytes(path, "box.step", _payload(marker))
    reseal(path)  # every checksum agrees: only the safe unpickler stands in the way
    problems = verify_checkpoint(path)  # ... which verify runs too
    assert [p.kind for p in problems] == [ProblemKind.UNSAFE] and problems[0].component == "box"
    assert "it would call io.open" in str(problems[0])
    target = Box({"weights": torch.zeros(3, 4), "config": {"name": "", "layers": [0, 0]}, "step": 0})
    coord = CheckpointCoordinator([StateComponent("box", target, "global")], output_dir=tmp_path / "run",
                                  verify_checksums=verify_checksums)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .box: box.step.: unpickling its stored value is not safe \(it would call io.open") as err:
        coord.load_checkpoint(path)
    assert isinstance(err.value, pickle.UnpicklingError) and isinstance(err.value, IntegrityError)


def test_malicious_pickle_is_refused_even_through_dcps_own_load_planner(tmp_path, marker):
    """DCP's DefaultLoadPlanner unpickles with weights_only=False; dcp_forge's reader vets the bytes first."""
    path = _coordinator(tmp_path / "run").save_checkpoint(checkpoint_id="c")
    replace_item_bytes(path, "box.step", _payload(marker))
    reseal(path)
    state = {"box": {"weights": torch.zeros(3, 4), "config": {"name": "", "layers": [0, 0]}, "step": 0}}
    with pytest.raises(CheckpointException) as err:  # DCP wraps every rank's error in its own
        dcp.load(state, storage_reader=open_reader(path))
    assert "UnsafeCheckpointError: refusing to load 'box.step'" in str(err.value)


def test_malicious_pickle_in_a_plain_dcp_checkpoint_is_refused(tmp_path, marker):
    path = tmp_path / "legacy"
    dcp.save({"box": _state()}, checkpoint_id=path)
    replace_item_bytes(path, "box.step", _payload(marker))  # plain DCP: no checksums to reseal
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        _coordinator(tmp_path).load_checkpoint(path)


@pytest.mark.parametrize("verify_checksums", [True, False])
def test_malicious_pickle_in_a_tensor_item_is_refused_naming_the_key(tmp_path, marker, verify_checksums):
    path = _coordinator(tmp_path / "run").save_checkpoint(checkpoint_id="c")
    replace_item_bytes(path, "box.weights", _payload(marker))
    reseal(path)
    problems = verify_checkpoint(path)
    assert [(p.kind, p.component) for p in problems] == [(ProblemKind.UNSAFE, "box")], problems
    assert "'box.weights'" in str(problems[0]) and "it would call io.open" in str(problems[0])
    target = Box({"weights": torch.zeros(3, 4), "config": {"name": "", "layers": [0, 0]}, "step": 0})
    coord = CheckpointCoordinator([StateComponent("box", target, "global")], output_dir=tmp_path / "run",
                                  verify_checksums=verify_checksums)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load 'box: box.weights': unpickling its stored "
                       r"value is not safe \(it would call io.open") as err:
        coord.load_checkpoint(path)
    assert isinstance(err.value, pickle.UnpicklingError) and isinstance(err.value, IntegrityError)
    assert torch.equal(target.state["weights"], torch.zeros(3, 4))


@pytest.mark.parametrize(("stored", "kind", "match"), [
    ([1, 2, 3], ProblemKind.MALFORMED, r"the stored tensor 'box: box.weights' holds a list, not a tensor"),
    (torch.arange(12), ProblemKind.WRONG_LAYOUT, r"holds a torch.int64 tensor \[12\]; .*torch.float32 tensor \[3, 4\]"),
    (torch.ones(4, 3), ProblemKind.WRONG_LAYOUT, r"holds a torch.float32 tensor \[4, 3\]; .*torch.float32 tensor \[3, 4\]"),
], ids=["a list", "another dtype", "another shape"])
def test_a_tensor_item_holding_something_else_is_refused(tmp_path, stored, kind, match):
    """Safe to unpickle, checksums re-sealed: the blob still contradicts what the records say it is."""
    path = _coordinator(tmp_path / "run").save_checkpoint(checkpoint_id="c")
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    replace_item_bytes(path, "box.weights", buffer.getvalue())
    reseal(path)
    problems = verify_checkpoint(path)
    assert [(p.kind, p.component) for p in problems] == [(kind, "box")], problems
    target = Box({"weights": torch.zeros(3, 4), "config": {"name": "", "layers": [0, 0]}, "step": 0})
    with pytest.raises(IntegrityError, match=match):
        CheckpointCoordinator([StateComponent("box", target, "global")], output_dir=tmp_path / "run").load_checkpoint(
            path)


def test_plain_dcp_metadata_of_an_older_torch_loads(tmp_path):
    """Older torch pickled ``TensorProperties`` from torch.distributed._shard; plain DCP loads that, so must we."""
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties as OldTensorProperties

    path = tmp_path / "legacy"
    dcp.save({"box": _state()}, checkpoint_id=path)
    metadata = read_metadata(path)
    for md in metadata.state_dict_metadata.values():
        if hasattr(md, "properties"):
            md.properties = OldTensorProperties(dtype=md.properties.dtype)
    write_metadata(path, metadata)
    data = (path / ".metadata").read_bytes()
    assert b"torch.distributed._shard.sharded_tensor.metadata" in data and b"MEM_FORMAT_ENCODING" in data
    plain = {"box": {"weights": torch.zeros(3, 4), "config": {"name": "", "layers": [0, 0]}, "step": 0}}
    dcp.load(plain, checkpoint_id=path)
    target = Box({"weights": torch.zeros(3, 4), "config": {"name": "", "layers": [0, 0]}, "step": 0})
    CheckpointCoordinator([StateComponent("box", target, "global")], output_dir=tmp_path).load_checkpoint(path)
    assert torch.equal(target.state["weights"], _state()["weights"]) and target.state["step"] == 3
    assert torch.equal(plain["box"]["weights"], _state()["weights"])
    assert verify_checkpoint(path) == []


def _malicious_metadata(path, marker: str, how: str) -> None:
    metadata = read_metadata(path)
    if how == "object":  # a __reduce__ payload anywhere in the metadata
        metadata = dataclasses.replace(metadata, planner_data={**metadata.planner_data, "x": CreatesFile(marker)})
        write_metadata(path, metadata)
        return
    # The module is one DCP itself pickles from; protocol 4 resolves the dotted name to builtins.open.
    def text(s: str) -> bytes:
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b

    payload = (b"\x80\x04" + text("torch.distributed.checkpoint.filesystem") + text("io.open") + b"\x93"
               + text(marker) + text("w") + b"\x86R.")
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("how", ["object", "dotted-name"])
@pytest.mark.parametrize("verify_checksums", [True, False])
def test_malicious_metadata_is_refused(tmp_path, marker, how, verify_checksums):
    path = _coordinator(tmp_path / "run").save_checkpoint(checkpoint_id="c")
    _malicious_metadata(path, marker, how)
    reseal(path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load checkpoint metadata: it references"):
        _coordinator(tmp_path / "run", verify_checksums=verify_checksums).load_checkpoint(path)
    problems = verify_checkpoint(path)
    assert [p.kind for p in problems] == [ProblemKind.UNSAFE] and problems[0].file == ".metadata"


@pytest.mark.parametrize("where", ["../outside.distcp", "/etc/hostname", "sub/../../x.distcp", ".."])
def test_stored_paths_cannot_leave_the_checkpoint(tmp_path, where):
    (tmp_path / "outside.distcp").write_bytes(b"secret bytes outside the checkpoint")
    path = _coordinator(tmp_path / "run").save_checkpoint(checkpoint_id="c")
    metadata = read_metadata(path)
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path=where)
    write_metadata(path, metadata)
    reseal(path)
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint directory"):
        _coordinator(tmp_path / "run").load_checkpoint(path)
    kinds = {p.kind for p in verify_checkpoint(path)}
    assert ProblemKind.UNSAFE in kinds


@pytest.mark.parametrize("key", ["../x", "a/b", "", "a.b", "/abs", "x@rank0", ".hidden", "a" * 129, "ü"])
def test_component_keys_cannot_name_paths(key):
    with pytest.raises(ComponentDeclarationError, match="'key' must be a non-empty identifier"):
        StateComponent(key, Box({}), "global")


SECRET_KEY, SECRET = "AKIAFORGETESTKEY0001", "s3cr3t-Forge/Test+Key"


def _exercise(url: str, options: dict) -> tuple[str, list[str], CheckpointCoordinator]:
    """Save, fail three ways, load; returns the checkpoint path and the error messages."""
    coord = _coordinator(url, storage_options=options)
    path = coord.save_checkpoint(checkpoint_id="c")
    messages = []
    for attempt in (lambda: coord.save_checkpoint(checkpoint_id="c"),  # already exists
                    lambda: coord.load_checkpoint(f"{url}/missing"),
                    lambda: coord.save_checkpoint(checkpoint_id="../x")):
        with pytest.raises((CheckpointExistsError, CheckpointNotFoundError, ValueError)) as err:
            attempt()
        messages.append(str(err.value) + "".join(getattr(err.value, "__notes__", [])))
    coord.load_checkpoint(path)
    return path, messages, coord


def _stored_text() -> list[str]:
    fs = fsspec.filesystem("memory")
    stored = {name: fs.cat_file(name) for name in fs.find("/")}
    assert any(name.endswith("checkpoint_manifest.json") for name in stored)
    fs.rm("/", recursive=True)
    return [data.decode("latin-1") for data in stored.values()]


def test_storage_option_credentials_never_reach_storage_logs_or_errors(caplog):
    caplog.set_level(logging.DEBUG)  # every logger, every level
    path, messages, coord = _exercise("memory://bucket/run", {"key": SECRET_KEY, "secret": SECRET, "token": SECRET})
    for text in [*_stored_text(), *(r.getMessage() for r in caplog.records), *messages, path,
                 repr(coord.last_manifest)]:
        assert SECRET not in text and SECRET_KEY not in text


def test_url_credentials_never_reach_manifests_records_or_messages(caplog):
    caplog.set_level(logging.DEBUG)
    # memory:// keeps "user:password@bucket" as part of its path, so fsspec's own debug log shows
    # it; dcp_forge's records, logs and errors must not.
    path, messages, coord = _exercise(f"memory://{SECRET_KEY}:{SECRET}@bucket/run", {})
    ours = [r.getMessage() for r in caplog.records if r.name.startswith(("dcp_forge", "torch"))]
    records = _stored_text()
    assert messages[0].startswith("checkpoint memory://***@bucket/run/c already exists")
    for text in [*records, *ours, *messages, repr(coord.last_manifest)]:
        assert SECRET not in text and SECRET_KEY not in text


@pytest.mark.parametrize(("url", "shown"), [
    ("s3://AKIA:abc/def+g@bucket/run", "s3://***@bucket/run"),
    ("s3://token@bucket/run", "s3://***@bucket/run"),
    ("s3://bucket/run@v2/checkpoint-1", "s3://bucket/run@v2/checkpoint-1"),
    ("memory://bucket/run", "memory://bucket/run"),
    ("/local/path@x", "/local/path@x"),
])
def test_redacted_urls(url, shown):
    assert redact_url(url) == shown


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_characters="@/:\\n", blacklist_categories=["Cs"]), min_size=1, max_size=20),
       st.text(st.characters(blacklist_characters="@\\n", blacklist_categories=["Cs"]), min_size=1, max_size=40),
       st.sampled_from(["s3", "gs", "memory", "https"]), st.sampled_from(["bucket/run", "b/r@x/c", "host:9000/p"]))
def test_redaction_never_shows_a_password(user, password, scheme, rest):
    shown = redact_url(f"{scheme}://{user}:{password}@{rest}")
    assert password not in shown.removeprefix(f"{scheme}://***@").replace(rest, "", 1) or password in rest
    assert shown.startswith(f"{scheme}://***@")
