"""Exact or refused: a load returns exactly what was saved or raises, and never reads outside the
checkpoint. Each class of damage here keeps every checksum agreeing (re-sealed with tests/support/tamper.py)
or removes the records that hold them, so only the cross-checks stand in the way; each test checks that
loading refuses it before filling anything, and that ``verify`` reports the same thing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import MetadataIndex

from dcp_forge import (
    CheckpointCoordinator,
    ForgeError,
    IntegrityError,
    ProblemKind,
    StateComponent,
    UnsafeCheckpointError,
    verify_checkpoint,
)
from dcp_forge.cli import EXIT_FOUND, main
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.format.index import decode_index
from dcp_forge.format.names import CLAIM_FILE, COMMIT_FILE, INDEX_FILE, MANIFEST_FILE, METADATA_FILE
from dcp_forge.ops.convert import load_checkpoint_state
from dcp_forge.ops.diff import diff_checkpoints
from dcp_forge.ops.inspection import OpenCheckpoint
from dcp_forge.storage import list_checkpoints
from tests.support.statefuls import Box
from tests.support.tamper import (
    drop_chunks,
    edit_index,
    edit_metadata,
    flip_value_byte,
    move_chunk,
    read_metadata,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(512, 512, generator=gen),  # 1 MiB: its data offset is recorded, read directly
            "a": torch.randn(64, generator=gen), "b": torch.randn(64, generator=gen),  # same size: swappable
            "rows": torch.randn(64, 32, generator=gen),  # stored as two chunks
            "step": seed, "name": f"run-{seed}"}


def _box(seed: int) -> Box:
    return Box(_state(seed))


def _coordinator(root, box: Box, **kwargs) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("box", box, "global")], output_dir=root,
                                 chunk_policy=ChunkPolicy(4096, 2), **kwargs)


@pytest.fixture
def saved(tmp_path):
    path = _coordinator(tmp_path / "run", _box(1)).save_checkpoint(checkpoint_id="c")
    assert verify_checkpoint(path) == []
    return path


def _records(path):
    return decode_index(Path(path, INDEX_FILE).read_bytes())


def _assert_untouched(box: Box, seed: int) -> None:
    """Nothing of the checkpoint reached ``box``: it holds the fresh state it was built with."""
    fresh = _state(seed)
    for key, value in box.state.items():
        assert torch.equal(value, fresh[key]) if isinstance(value, torch.Tensor) else value == fresh[key], key


def _refused(root, path, error=IntegrityError, match=None, **load_kwargs) -> pytest.ExceptionInfo:
    """Loading ``path`` raises ``error`` and leaves the destination as it was."""
    box = _box(2)
    with pytest.raises(error, match=match) as err:
        _coordinator(root, box, verify_checksums=load_kwargs.pop("verify_checksums", True)).load_checkpoint(
            path, **load_kwargs)
    _assert_untouched(box, 2)
    return err


# --- the stored chunks tile every tensor a load fills ------------------------------------------------
DAMAGED_TILINGS = {
    "a chunk missing": (lambda path: drop_chunks(path, "box.rows", lambda chunks: chunks[1:]),
                        r"its chunks cover 1024 of its 2048 elements"),
    "no chunk at all": (lambda path: drop_chunks(path, "box.rows", lambda chunks: list(chunks)),
                        r"its chunks cover 0 of its 2048 elements"),
    "chunks overlapping": (lambda path: move_chunk(path, "box.rows", -1), r"its chunks at offsets .* overlap"),
}


@pytest.mark.parametrize("damage", DAMAGED_TILINGS)
@pytest.mark.parametrize("selection", [{}, {"components": ["box"]}, {"keys": {"box": ["rows", "a"]}}],
                         ids=["everything", "components=", "keys="])
def test_a_tensor_its_chunks_do_not_tile_is_refused_before_anything_is_filled(saved, tmp_path, damage, selection):
    change, why = DAMAGED_TILINGS[damage]
    change(saved)
    problems = [p for p in verify_checkpoint(saved) if p.kind is ProblemKind.INCOMPLETE]
    assert problems and problems[0].component == "box" and "'box.rows'" in str(problems[0]), problems
    _refused(tmp_path / "run", saved, match=rf"tensor 'box.rows' of component 'box' cannot be loaded exactly: {why}",
             **selection)


def test_a_partial_load_of_intact_tensors_beside_a_damaged_one_is_exact(saved, tmp_path):
    drop_chunks(saved, "box.rows", lambda chunks: chunks[1:])
    box = _box(2)
    _coordinator(tmp_path / "run", box).load_checkpoint(saved, keys={"box": ["a", "big"]})
    assert torch.equal(box.state["a"], _state(1)["a"]) and torch.equal(box.state["big"], _state(1)["big"])
    assert torch.equal(box.state["rows"], _state(2)["rows"])  # not selected: kept its value


# --- every location read is the index's row for that item ----------------------------------------------
def test_swapped_locations_in_a_resealed_metadata_are_refused(saved, tmp_path):
    def swap(metadata):
        a, b = MetadataIndex("box.a", [0]), MetadataIndex("box.b", [0])
        metadata.storage_data[a], metadata.storage_data[b] = metadata.storage_data[b], metadata.storage_data[a]

    edit_metadata(saved, swap)
    problems = verify_checkpoint(saved)
    assert problems and {p.kind for p in problems} == {ProblemKind.INCOMPLETE}, problems
    assert {p.component for p in problems} == {"box"}
    _refused(tmp_path / "run", saved, match=r"index.parquet and .metadata disagree about the item stored in "
             r"__\d_\d\.distcp at byte \d+ \(index vs metadata: fqn 'box.[ab]' vs 'box.[ab]'\): refusing to load")


# --- never outside the checkpoint ----------------------------------------------------------------------
def _other(tmp_path) -> str:
    """Another checkpoint of the same layout (same file names, other values)."""
    path = tmp_path / "other" / "c"
    if not path.exists():
        _coordinator(tmp_path / "other", _box(3)).save_checkpoint(checkpoint_id="c")
    return str(path)


READERS = {
    "load": lambda path, tmp_path: _coordinator(tmp_path / "run", _box(2)).load_checkpoint(path),
    "load, checksums off": lambda path, tmp_path: _coordinator(tmp_path / "run", _box(2),
                                                               verify_checksums=False).load_checkpoint(path),
    "inspect": lambda path, tmp_path: OpenCheckpoint.open(path).read_values(["box.a", "box.big"]),
    "diff": lambda path, tmp_path: diff_checkpoints(path, _other(tmp_path)),
    "convert": lambda path, tmp_path: load_checkpoint_state(path),
}


def _point_at(path, fqn: str, name: str) -> None:
    """Record ``name`` as the data file of ``fqn`` in .metadata and the index alike, then reseal."""
    def edit(metadata):
        index = next(i for i in metadata.storage_data if i.fqn == fqn)
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path=name)

    edit_metadata(path, edit)
    edit_index(path, lambda rows: [dataclasses.replace(r, file=name) if r.fqn == fqn else r for r in rows])


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["../../outside.pt", "/etc/hostname", "sub/../../x.distcp"])
def test_no_reader_opens_a_file_named_outside_the_checkpoint(saved, tmp_path, reader, name):
    shutil.copy(os.path.join(saved, _records(saved)[0].file), tmp_path / "outside.pt")  # a valid blob, outside
    _point_at(saved, "box.a", name)
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint directory"):
        READERS[reader](saved, tmp_path)
    assert ProblemKind.UNSAFE in {p.kind for p in verify_checkpoint(saved)}


@pytest.mark.parametrize("reader", READERS)
def test_no_reader_follows_a_symlinked_data_file(saved, tmp_path, reader):
    """The link leads to the same file of another checkpoint: valid blobs, other values."""
    other = _other(tmp_path)
    name = next(r.file for r in _records(saved) if r.fqn == "box.a")
    os.remove(os.path.join(saved, name))
    os.symlink(os.path.join(other, name), os.path.join(saved, name))
    with pytest.raises(UnsafeCheckpointError, match=rf"{name}.*symbolic link"):
        READERS[reader](saved, tmp_path)
    problems = verify_checkpoint(saved)
    assert [(p.kind, p.file) for p in problems] == [(ProblemKind.UNSAFE, name)], problems


@pytest.mark.parametrize("verify_checksums", [True, False])
def test_a_symlinked_data_file_leaves_the_destination_untouched(saved, tmp_path, verify_checksums):
    other = _other(tmp_path)
    for name in {r.file for r in _records(saved)}:
        os.remove(os.path.join(saved, name))
        os.symlink(os.path.join(other, name), os.path.join(saved, name))
    _refused(tmp_path / "run", saved, UnsafeCheckpointError, "symbolic link", verify_checksums=verify_checksums)


@pytest.mark.parametrize("record", [METADATA_FILE, MANIFEST_FILE, INDEX_FILE, COMMIT_FILE])
def test_a_symlinked_record_is_refused(saved, tmp_path, record):
    other = _other(tmp_path)
    os.remove(os.path.join(saved, record))
    os.symlink(os.path.join(other, record), os.path.join(saved, record))
    _refused(tmp_path / "run", saved, UnsafeCheckpointError, "symbolic link")
    assert verify_checkpoint(saved)[0].kind is ProblemKind.UNSAFE


# --- extents are bounded by the file before anything is allocated or read ------------------------------
EXTENTS = {"length past the end (2**44)": (None, 2**44), "negative offset": (-8, None), "negative length": (None, -1)}


@pytest.mark.parametrize("extent", EXTENTS)
@pytest.mark.parametrize("kind", ["dcp_forge", "plain DCP"])
def test_a_recorded_extent_the_file_cannot_hold_is_refused_naming_file_and_key(saved, tmp_path, extent, kind):
    offset, length = EXTENTS[extent]
    if kind == "plain DCP":
        saved = str(tmp_path / "plain")
        dcp.save({"box": _state(1)}, checkpoint_id=saved)
    location = next(info for index, info in read_metadata(saved).storage_data.items() if index.fqn == "box.a")
    offset = location.offset if offset is None else offset
    length = location.length if length is None else length

    def edit(metadata):
        index = next(i for i in metadata.storage_data if i.fqn == "box.a")
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], offset=offset, length=length)

    edit_metadata(saved, edit)
    if kind == "dcp_forge":  # the index says the same, so only the bounds stand in the way
        edit_index(saved, lambda rows: [dataclasses.replace(r, offset=offset, length=length) if r.fqn == "box.a"
                                        else r for r in rows])
    err = _refused(tmp_path / "run", saved)
    assert location.relative_path in str(err.value) and "'box.a'" in str(err.value), err.value
    problems = verify_checkpoint(saved)
    assert problems and any(location.relative_path in str(p) and "box.a" in str(p) for p in problems), problems


# --- records removed: never a downgrade to an unchecked plain DCP load ----------------------------------
@pytest.mark.parametrize("removed", [(COMMIT_FILE, CLAIM_FILE, MANIFEST_FILE),
                                     (COMMIT_FILE, CLAIM_FILE, MANIFEST_FILE, INDEX_FILE)],
                         ids=["marker, claim and manifest", "every dcp_forge record"])
def test_removing_the_records_never_downgrades_to_an_unchecked_load(saved, tmp_path, removed, capsys):
    record = next(r for r in _records(saved) if r.fqn.startswith("box.big"))
    flip_value_byte(saved, record, _state(1)["big"][record.chunk_offsets[0]].numpy().tobytes())
    for name in removed:
        os.remove(os.path.join(saved, name))
    err = _refused(tmp_path / "run", saved, (IntegrityError, FileNotFoundError))
    assert isinstance(err.value, ForgeError)
    problems = verify_checkpoint(saved)
    assert [p.kind for p in problems] == [ProblemKind.NOT_COMMITTED], problems
    assert main(["verify", str(saved)]) == EXIT_FOUND
    assert "OK" not in capsys.readouterr().out
    with pytest.raises(ForgeError):  # inspect and diff read through the same records
        OpenCheckpoint.open(saved).read_values(["box.a"])
    if INDEX_FILE in removed:  # .metadata still says dcp_forge wrote it
        assert "was written by dcp_forge" in str(err.value) and "Refusing to load it as a plain DCP" in str(err.value)
    else:
        assert list_checkpoints(tmp_path / "run") == []


# --- .metadata records what DCP's own writer records ----------------------------------------------------
def test_metadata_records_the_save_ids_and_version_as_dcps_writer_does(saved, tmp_path):
    dcp.save({"box": _state(1)}, checkpoint_id=tmp_path / "plain")
    theirs = FileSystemReader(tmp_path / "plain").read_metadata()
    ours = FileSystemReader(saved).read_metadata()
    marker = json.loads(Path(saved, COMMIT_FILE).read_text())
    assert ours.storage_meta.save_id == marker["save_id"] and ours.storage_meta.checkpoint_id == saved
    assert ours.version == theirs.version == CURRENT_DCP_VERSION
    assert theirs.storage_meta.save_id and theirs.storage_meta.checkpoint_id is not None
