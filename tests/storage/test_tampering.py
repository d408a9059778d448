"""The tampering matrix: every record of a committed checkpoint (``_COMMITTED``, ``_CLAIMED``, the manifest,
``.metadata``, ``index.parquet``, a data file) deleted, truncated, swapped with another checkpoint's copy,
or edited and re-sealed (every checksum of the chain recomputed, tests/support/tamper.py), plus the
records removed together. Each cell is either refused by load *and* reported by ``verify``, or, only
where the change cannot alter what a load fills, loads bit-exactly and verifies clean.

What no check can catch, and so is no cell here: a stored *value* changed with every checksum
recomputed, or every record rewritten consistently (checksums give integrity, not authenticity;
docs/INTEGRITY.md)."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

from dcp_forge import CheckpointCoordinator, ForgeError, RNGState, StateComponent, verify_checkpoint
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.format.names import CLAIM_FILE, COMMIT_FILE, INDEX_FILE, MANIFEST_FILE, METADATA_FILE
from tests.support.statefuls import Box
from tests.support.tamper import (
    edit_index,
    edit_metadata,
    replace_item_bytes,
    reseal,
    set_data_offsets,
    truncate,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DATA_FILE = "__0_0.distcp"
RECORDS = (COMMIT_FILE, CLAIM_FILE, MANIFEST_FILE, METADATA_FILE, INDEX_FILE, DATA_FILE)


def _components(seed: int) -> list[StateComponent]:
    gen = torch.Generator().manual_seed(seed)
    box = {"big": torch.randn(512, 512, generator=gen),  # its data offset is recorded: read directly
           "a": torch.randn(64, generator=gen), "b": torch.randn(64, generator=gen),  # same size
           "rows": torch.randn(64, 32, generator=gen),  # stored as two chunks
           "step": seed, "name": f"run-{seed}"}
    torch.manual_seed(seed)
    return [StateComponent("box", Box(box), "global"),
            StateComponent("model", torch.nn.Linear(8, 4), "replicated"),
            StateComponent("rng", RNGState(), "per_rank")]


def _coordinator(root, components) -> CheckpointCoordinator:
    return CheckpointCoordinator(components, output_dir=root, chunk_policy=ChunkPolicy(4096, 2))


def _snapshot(components) -> dict:
    return {c.key: copy.deepcopy(c.stateful.state_dict()) for c in components}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The checkpoint every cell damages (a copy of it), the state it holds, and another checkpoint of
    the same layout (same file names, other values) to swap records with."""
    root = tmp_path_factory.mktemp("tampering")
    components = _components(1)
    saved = _snapshot(components)
    path = _coordinator(root / "run", components).save_checkpoint(checkpoint_id="c")
    other = _coordinator(root / "other", _components(7)).save_checkpoint(checkpoint_id="c")
    assert verify_checkpoint(path) == [] and DATA_FILE in os.listdir(path)
    return path, saved, other


# --- the damage ---------------------------------------------------------------------------------------
def _deleted(name: str) -> Callable[[str, str], None]:
    return lambda path, other: os.remove(os.path.join(path, name))


def _truncated(name: str) -> Callable[[str, str], None]:
    def change(path, other):
        file = os.path.join(path, name)
        truncate(file, 100 if name == DATA_FILE else os.path.getsize(file) // 2)
    return change


def _swapped(name: str) -> Callable[[str, str], None]:
    return lambda path, other: shutil.copy(os.path.join(other, name), os.path.join(path, name))


def _json_edit(name: str, edit: Callable[[dict], None]) -> Callable[[str, str], None]:
    def change(path, other):
        file = os.path.join(path, name)
        data = json.loads(Path(file).read_text())
        edit(data)
        Path(file).write_text(json.dumps(data))
    return change


def _manifest_edit(edit: Callable[[dict], None]) -> Callable[[str, str], None]:
    return lambda path, other: reseal(path, manifest_edit=edit)


def _metadata_edit(edit: Callable) -> Callable[[str, str], None]:
    return lambda path, other: edit_metadata(path, edit)


def _index_edit(edit: Callable) -> Callable[[str, str], None]:
    return lambda path, other: edit_index(path, edit)


def _location(metadata, fqn: str):
    return next(i for i in metadata.storage_data if i.fqn == fqn)


def _swap_locations(metadata) -> None:
    a, b = _location(metadata, "box.a"), _location(metadata, "box.b")
    metadata.storage_data[a], metadata.storage_data[b] = metadata.storage_data[b], metadata.storage_data[a]


def _share_location(metadata) -> None:
    metadata.storage_data[_location(metadata, "box.b")] = metadata.storage_data[_location(metadata, "box.a")]


def _set_location(fqn: str, **fields) -> Callable:
    def edit(metadata):
        index = _location(metadata, fqn)
        metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], **fields)
    return edit


def _metadata_dtype(metadata) -> None:
    metadata.state_dict_metadata["box.a"].properties.dtype = torch.int32  # same item size


def _drop_metadata_chunk(metadata) -> None:
    md = metadata.state_dict_metadata["box.rows"]
    gone = md.chunks.pop()
    del metadata.storage_data[MetadataIndex("box.rows", gone.offsets)]


def _overlap_metadata_chunk(metadata) -> None:
    md = metadata.state_dict_metadata["box.rows"]
    chunk = md.chunks[1]
    moved = dataclasses.replace(chunk, offsets=torch.Size([chunk.offsets[0] - 1, *chunk.offsets[1:]]))
    md.chunks[1] = moved
    metadata.storage_data[MetadataIndex("box.rows", moved.offsets)] = metadata.storage_data.pop(
        MetadataIndex("box.rows", chunk.offsets))


def _rows(edit: Callable) -> Callable:
    return lambda rows: [edit(r) for r in rows]


def _swap_fqns(r):
    return dataclasses.replace(r, fqn={"box.a": "box.b", "box.b": "box.a"}.get(r.fqn, r.fqn))


def _row_of(fqn: str, **fields) -> Callable:
    return _rows(lambda r: dataclasses.replace(r, **fields) if r.fqn == fqn else r)


def _payload(stored) -> bytes:
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    return buffer.getvalue()


class _RunsCode:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _replaced(fqn: str, stored) -> Callable[[str, str], None]:
    def change(path, other):
        replace_item_bytes(path, fqn, _payload(stored))
        reseal(path)
    return change


def _appended(path, other):
    with open(os.path.join(path, DATA_FILE), "ab") as f:
        f.write(b"more bytes")
    reseal(path)


def _world(size: int, topology: bool) -> Callable[[dict], None]:
    def edit(data):
        data["world_size"] = size
        if topology:
            data["topology"] = {"world_size": size, "num_nodes": 1, "node_of_rank": [0] * size, "groups": {}}
    return edit


RESEALED: dict[str, dict[str, tuple[Callable[[str, str], None], bool]]] = {
    # record -> what was edited -> (the change, whether it leaves what a load fills alone)
    COMMIT_FILE: {"fields no load reads": (_json_edit(COMMIT_FILE, lambda d: d.update(
        committed_at=d["committed_at"] + 3600, checkpoint_id="elsewhere", save_id="dcp_forge-0")), True)},
    CLAIM_FILE: {"its save id and time": (_json_edit(CLAIM_FILE, lambda d: d.update(save_id="x", claimed_at=0.0)),
                                          True)},
    MANIFEST_FILE: {
        "world size": (_manifest_edit(_world(2, topology=False)), False),
        "world size and topology": (_manifest_edit(_world(2, topology=True)), False),
        "a sharing pattern": (_manifest_edit(lambda d: d["components"]["box"].update(sharing_pattern="replicated")),
                              False),
        "a copy's writers": (_manifest_edit(lambda d: d["components"]["model"]["copies"]["model"].update(
            writers=[1])), False),
        "timestamp and versions": (_manifest_edit(lambda d: d.update(
            timestamp="2001-01-01T00:00:00+00:00", versions={"torch": "0.1"})), True),
    },
    METADATA_FILE: {
        "two same-size locations swapped": (_metadata_edit(_swap_locations), False),
        "two items at one location": (_metadata_edit(_share_location), False),
        "a dtype of the same size": (_metadata_edit(_metadata_dtype), False),
        "a chunk dropped": (_metadata_edit(_drop_metadata_chunk), False),
        "chunks overlapping": (_metadata_edit(_overlap_metadata_chunk), False),
        "a length past the file's end": (_metadata_edit(_set_location("box.a", length=2**44)), False),
        "a negative offset": (_metadata_edit(_set_location("box.a", offset=-8)), False),
        "a file outside the checkpoint": (_metadata_edit(_set_location("box.a", relative_path="../x.distcp")), False),
    },
    INDEX_FILE: {
        "two rows' fqns swapped": (_index_edit(_rows(_swap_fqns)), False),
        "a row's dtype": (_index_edit(_row_of("box.a", dtype="torch.int32")), False),
        "a row dropped": (_index_edit(lambda rows: [r for r in rows if r.fqn != "box.b"]), False),
        "a tensor's data offset": (lambda path, other: set_data_offsets(
            path, lambda r: r.data_offset + 64 if r.data_offset is not None else None), False),
        "a row's pattern": (_index_edit(_row_of("box.a", pattern="replicated")), False),
        "a row's component": (_index_edit(_row_of("box.a", component="model")), False),
        "a negative length": (_index_edit(_row_of("box.a", length=-1)), False),
        "a file outside the checkpoint": (_index_edit(_row_of("box.a", file="../x.distcp")), False),
    },
    DATA_FILE: {
        "a tensor replaced by pickled code": (_replaced("box.a", _RunsCode()), False),
        "a tensor replaced by another dtype": (_replaced("box.a", torch.arange(64, dtype=torch.int32)), False),
        "a value replaced by pickled code": (_replaced("box.step", _RunsCode()), False),
        "bytes appended": (_appended, False),
    },
}


# Re-sealed edits only the bytes of the item itself contradict: the recorded offset of a directly read
# tensor (proven by the blob's edges read with it) and stored items replaced by something else.
SEEN_ON_READ = {"a tensor's data offset", "a tensor replaced by pickled code", "a tensor replaced by another dtype",
                "a value replaced by pickled code"}


@dataclass(frozen=True)
class Tamper:
    record: str
    how: str
    change: Callable[[str, str], None]
    exact: bool  # the change cannot alter what a load fills: it must load bit-exactly and verify clean
    # Only an item's own bytes give the damage away, as the item is read: refused then, with the items
    # read before it already in place (as with DCP's own reader). Everything else is refused up front.
    seen_on_read: bool = False

    def __str__(self) -> str:
        return f"{self.record} {self.how}"


def _matrix() -> list[Tamper]:
    cells = []
    for record in RECORDS:
        harmless = record == CLAIM_FILE  # only consulted while a save runs
        cells += [Tamper(record, "deleted", _deleted(record), harmless),
                  Tamper(record, "truncated", _truncated(record), harmless),
                  Tamper(record, "swapped with another checkpoint's", _swapped(record), harmless,
                         seen_on_read=record == DATA_FILE)]
        cells += [Tamper(record, f"re-sealed: {what}", change, exact, seen_on_read=what in SEEN_ON_READ)
                  for what, (change, exact) in RESEALED[record].items()]

    def removed(*names):
        return lambda path, other: [os.remove(os.path.join(path, n)) for n in names]

    cells += [Tamper("marker, claim and manifest", "deleted", removed(COMMIT_FILE, CLAIM_FILE, MANIFEST_FILE), False),
              Tamper("every dcp_forge record", "deleted",
                     removed(COMMIT_FILE, CLAIM_FILE, MANIFEST_FILE, INDEX_FILE), False)]
    return cells


MATRIX = _matrix()


def test_the_matrix_covers_every_record_and_every_kind_of_damage():
    kinds = ("deleted", "truncated", "swapped", "re-sealed")
    for record in RECORDS:
        assert all(any(t.record == record and t.how.startswith(kind) for t in MATRIX) for kind in kinds), record


def _equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(_equal(a, b) for a, b in zip(x, y, strict=True))
    return type(x) is type(y) and x == y


@pytest.mark.parametrize("tamper", MATRIX, ids=str)
def test_tampered_checkpoint_is_refused_or_loads_exactly(pristine, tmp_path, tamper, capsys):
    original, saved, other = pristine
    path = str(tmp_path / "c")
    shutil.copytree(original, path)
    tamper.change(path, other)
    problems = verify_checkpoint(path)
    components = _components(2)
    fresh = _snapshot(components)
    coord = _coordinator(tmp_path / "load", components)
    if tamper.exact:
        assert problems == [], [str(p) for p in problems]
        coord.load_checkpoint(path)
        loaded = _snapshot(components)
        assert all(_equal(saved[k], loaded[k]) for k in saved), "not bit-exact"
        return
    assert problems, "verify found nothing wrong"
    with pytest.raises(ForgeError) as err:
        coord.load_checkpoint(path)
    assert isinstance(err.value, (ValueError, FileNotFoundError)), type(err.value).__mro__
    assert "pickled code ran" not in capsys.readouterr().out
    if not tamper.seen_on_read:
        assert all(_equal(fresh[k], _snapshot(components)[k]) for k in ("box", "model")), "state changed"
