"""Checksums on load and ``verify_checkpoint``: every kind of damage is found and named (file and
component), loading refuses it by default, and ``verify_checksums=False`` turns the checks off."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_forge import (
    CheckpointCoordinator,
    CheckpointNotFoundError,
    IntegrityError,
    ProblemKind,
    RNGState,
    StateComponent,
    verify_checkpoint,
)
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.format.index import decode_index
from dcp_forge.format.names import CLAIM_FILE, COMMIT_FILE, INDEX_FILE, MANIFEST_FILE, METADATA_FILE
from tests.support.statefuls import Box
from tests.support.tamper import data_files, flip_byte, flip_value_byte, set_data_offsets, truncate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(256, 64, generator=gen), "small": torch.arange(7) * seed, "step": seed,
            "name": f"run-{seed}"}


def _components(seed: int) -> list[StateComponent]:
    torch.manual_seed(seed)
    return [StateComponent("model", torch.nn.Linear(16, 8), "replicated"),
            StateComponent("box", Box(_state(seed)), "global"),
            StateComponent("rng", RNGState(), "per_rank")]


def _coordinator(root, seed: int = 1, **kwargs) -> CheckpointCoordinator:
    return CheckpointCoordinator(_components(seed), output_dir=root, chunk_policy=ChunkPolicy(4096, 2), **kwargs)


@pytest.fixture
def saved(tmp_path):
    """A committed checkpoint with chunked tensors, plain values and two data files."""
    path = _coordinator(tmp_path).save_checkpoint(checkpoint_id="checkpoint-1")
    assert verify_checkpoint(path) == []
    return path


def _records(path):
    return decode_index(Path(os.path.join(path, INDEX_FILE)).read_bytes())


def _only(problems, kind):
    assert [p.kind for p in problems] == [kind], [str(p) for p in problems]
    return problems[0]


def test_intact_checkpoint_has_no_problems_and_progress_counts_every_byte(saved):
    seen = []
    assert verify_checkpoint(saved, progress=seen.append, thread_count=1) == []
    assert sum(seen) == sum(r.stored_bytes for r in _records(saved))  # every byte once (packs overlap)
    assert len(data_files(saved)) == 2


def test_flipped_byte_in_a_data_file(saved, tmp_path):
    record = next(r for r in _records(saved) if r.component == "box" and r.kind == "tensor")
    flip_byte(os.path.join(saved, record.file), record.offset + record.length - 3)
    problem = _only(verify_checkpoint(saved), ProblemKind.CHECKSUM_MISMATCH)
    assert problem.file == record.file and problem.component == "box"
    assert record.file in str(problem) and "'box'" in str(problem)
    with pytest.raises(IntegrityError, match=rf"checksum mismatch in {record.file} .*component 'box'"):
        _coordinator(tmp_path, seed=2).load_checkpoint(saved)


def test_checksums_on_load_can_be_turned_off(saved, tmp_path):
    record = next(r for r in _records(saved) if r.fqn.startswith("box.big"))
    first_row = _state(1)["big"][record.chunk_offsets[0]]
    flip_value_byte(saved, record, first_row.numpy().tobytes())
    components = _components(2)
    CheckpointCoordinator(components, output_dir=tmp_path, verify_checksums=False).load_checkpoint(saved)
    loaded = components[1].stateful.state["big"]
    assert not torch.equal(loaded, _state(1)["big"])  # the damage came through, as asked
    assert (loaded != _state(1)["big"]).sum() == 1


def test_truncated_data_file(saved, tmp_path):
    name = data_files(saved)[0]
    truncate(os.path.join(saved, name), 100)
    problem = _only(verify_checkpoint(saved), ProblemKind.TRUNCATED)
    assert problem.file == name and problem.component in {"model", "box", "rng"}
    assert f"data file {name} is truncated" in str(problem) and repr(problem.component) in str(problem)
    with pytest.raises(IntegrityError, match=f"data file {name} is truncated"):
        _coordinator(tmp_path, seed=2).load_checkpoint(saved)


def test_missing_data_file(saved, tmp_path):
    name = data_files(saved)[1]
    os.remove(os.path.join(saved, name))
    problem = _only(verify_checkpoint(saved), ProblemKind.MISSING_FILE)
    assert problem.file == name and f"data file {name} is missing" in str(problem)
    with pytest.raises(IntegrityError, match=f"data file {name} is missing"):
        _coordinator(tmp_path, seed=2).load_checkpoint(saved)


def test_bytes_appended_to_a_data_file(saved):
    name = data_files(saved)[0]
    with open(os.path.join(saved, name), "ab") as f:
        f.write(b"junk")
    problem = _only(verify_checkpoint(saved), ProblemKind.TRAILING_BYTES)
    assert problem.file == name and "4 bytes after its last item" in str(problem)


def test_stale_manifest_from_another_checkpoint(saved, tmp_path):
    other = _coordinator(tmp_path, seed=5).save_checkpoint(checkpoint_id="checkpoint-2")
    shutil.copy(os.path.join(other, MANIFEST_FILE), os.path.join(saved, MANIFEST_FILE))
    kinds = [p.kind for p in verify_checkpoint(saved)]
    assert kinds[0] is ProblemKind.STALE_MANIFEST
    stale = verify_checkpoint(saved)[0]
    assert stale.file == MANIFEST_FILE and "not the manifest this checkpoint was committed with" in str(stale)
    with pytest.raises(IntegrityError, match="not the manifest this checkpoint was committed with"):
        _coordinator(tmp_path, seed=2).load_checkpoint(saved)


def test_all_records_swapped_in_from_another_checkpoint(saved, tmp_path):
    """Marker, manifest, metadata and index agree with each other: the data checksums still catch it."""
    other = _coordinator(tmp_path, seed=5).save_checkpoint(checkpoint_id="checkpoint-2")
    for name in (COMMIT_FILE, MANIFEST_FILE, METADATA_FILE, INDEX_FILE):
        shutil.copy(os.path.join(other, name), os.path.join(saved, name))
    problems = verify_checkpoint(saved)
    assert problems and {p.kind for p in problems} == {ProblemKind.CHECKSUM_MISMATCH}
    assert {p.component for p in problems} >= {"box", "model"}
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        _coordinator(tmp_path, seed=2).load_checkpoint(saved)


@pytest.mark.parametrize("name", [METADATA_FILE, INDEX_FILE])
def test_flipped_byte_in_metadata_or_index(saved, tmp_path, name):
    flip_byte(os.path.join(saved, name), os.path.getsize(os.path.join(saved, name)) // 2)
    problems = verify_checkpoint(saved)
    assert problems[0].kind is ProblemKind.CHECKSUM_MISMATCH and problems[0].file == name
    assert f"{name} does not match the manifest" in str(problems[0])
    with pytest.raises(IntegrityError, match=f"{name} does not match the manifest"):
        _coordinator(tmp_path, seed=2).load_checkpoint(saved)


@pytest.mark.parametrize("name", [MANIFEST_FILE, METADATA_FILE, INDEX_FILE])
def test_missing_record_file(saved, tmp_path, name):
    os.remove(os.path.join(saved, name))
    problems = verify_checkpoint(saved)
    assert problems[0].kind is ProblemKind.MISSING_FILE and problems[0].file == name
    with pytest.raises(IntegrityError, match=f"is missing {name}"):
        _coordinator(tmp_path, seed=2).load_checkpoint(saved)


def test_malformed_commit_marker(saved):
    with open(os.path.join(saved, COMMIT_FILE), "w") as f:
        f.write("{not json")
    problem = verify_checkpoint(saved)[0]
    assert problem.kind is ProblemKind.MALFORMED and problem.file == COMMIT_FILE


def test_manifest_and_index_disagree(saved):
    manifest = json.loads(Path(os.path.join(saved, MANIFEST_FILE)).read_text())
    manifest["components"]["box"]["copies"]["box"]["size_bytes"] += 1
    with open(os.path.join(saved, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)
    kinds = {p.kind for p in verify_checkpoint(saved)}
    assert kinds == {ProblemKind.STALE_MANIFEST, ProblemKind.INCOMPLETE}
    incomplete = next(p for p in verify_checkpoint(saved) if p.kind is ProblemKind.INCOMPLETE)
    assert incomplete.component == "box" and "copy 'box' of component 'box'" in str(incomplete)


def test_uncommitted_and_missing_checkpoints(saved, tmp_path):
    os.remove(os.path.join(saved, COMMIT_FILE))
    problem = _only(verify_checkpoint(saved), ProblemKind.NOT_COMMITTED)
    assert "never committed" in str(problem) and CLAIM_FILE in str(problem)
    _only(verify_checkpoint(tmp_path / "nope"), ProblemKind.MISSING_CHECKPOINT)
    with pytest.raises(CheckpointNotFoundError):
        _coordinator(tmp_path, seed=2).load_checkpoint(saved)


def test_plain_dcp_checkpoint_presence_and_extents(tmp_path):
    path = tmp_path / "legacy"
    dcp.save({"model": torch.nn.Linear(32, 32), "box": Box(_state(3))}, checkpoint_id=path)
    assert verify_checkpoint(path) == []
    name = data_files(path)[0]
    truncate(path / name, 10)
    problem = _only(verify_checkpoint(path), ProblemKind.TRUNCATED)
    assert problem.file == name


def test_memory_backend(tmp_path):
    url = "memory://verify-test/run"
    path = _coordinator(url).save_checkpoint(checkpoint_id="checkpoint-1")
    assert verify_checkpoint(path) == []
    import fsspec

    fs = fsspec.filesystem("memory")
    name = next(n for n in fs.ls(path.removeprefix("memory://"), detail=False) if n.endswith(".distcp"))
    data = bytearray(fs.cat_file(name))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(name, bytes(data))
    problem = _only(verify_checkpoint(path), ProblemKind.CHECKSUM_MISMATCH)
    assert problem.file == os.path.basename(name)
    fs.rm("/verify-test", recursive=True)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("change", [lambda r: r.data_offset + 64, lambda r: r.data_offset - 8,
                                    lambda r: r.length])
def test_a_recorded_tensor_offset_the_blob_contradicts(tmp_path, monkeypatch, change, packed):
    from dcp_forge.storage import writer

    if not packed:  # a torch.save zip of its own, as plain DCP and checkpoints before packs store it
        monkeypatch.setattr(writer, "_packable", lambda item, data, form: None)
    box = Box({"w": torch.randn(512, 512), "b": torch.ones(3)})  # "w": 1 MiB, its offset recorded
    path = CheckpointCoordinator([StateComponent("box", box, "global")], output_dir=tmp_path).save_checkpoint(
        checkpoint_id="c")
    record = next(r for r in _records(path) if r.fqn == "box.w")
    assert record.data_offset is not None and (record.gap_offset is not None) == packed and verify_checkpoint(path) == []
    set_data_offsets(path, lambda r: change(r) if r.fqn == "box.w" else r.data_offset)
    problem = _only(verify_checkpoint(path), ProblemKind.WRONG_LAYOUT)
    assert problem.file == INDEX_FILE and problem.component == "box"
    if packed:  # a packed tensor's bytes always follow its 38-byte local header
        assert f"records no plain tensor at byte {record.data_offset} of it (data offset {change(record)})" in problem.message
    else:
        assert f"its zip records say it holds a torch.float32 tensor [512, 512] at byte {record.data_offset}" in problem.message


def test_thread_count_is_validated(saved):
    with pytest.raises(ValueError, match="'thread_count' must be a positive int"):
        verify_checkpoint(saved, thread_count=0)
