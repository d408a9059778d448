"""Looking inside checkpoints without loading them: listings, summaries, and single stored values.

Everything here reads the small record files (commit marker, manifest) and only the columns of
``index.parquet`` it needs, never DCP's pickled ``.metadata`` — except for plain DCP ("legacy")
checkpoints, which have nothing else and whose metadata is unpickled with the restricted loader.
A 1,000,000-item index is summarised in well under a second this way (benchmarks/index_scale.py).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from ..core.keys import top_level_key
from ..errors import CheckpointNotFoundError, IntegrityError
from ..format.index import INDEX_SCHEMA, own_pieces, read_index_table
from ..format.manifest import CheckpointManifest
from ..format.names import (
    CLAIM_FILE,
    COMMIT_FILE,
    DATA_SUFFIX,
    INDEX_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    TIER_FILE,
    stripped_checkpoint_message,
    written_by_dcp_forge,
)
from ..format.tier_record import TierRecord
from ..storage import (
    CheckpointState,
    RecordFiles,
    StorageBackend,
    check_extent,
    checkpoint_state,
    join_url,
    open_backend,
    open_data_file,
    raise_if_problems,
    read_commit,
    record_problems,
    redact_url,
)

# torch is imported inside the functions that read values or DCP metadata: listing and summarising
# committed checkpoints (``dcp-forge ls`` / ``inspect``) then start in a fraction of a second.

_STEP_RE = re.compile(r"(\d+)$")
# What read_values needs from the index.
VALUE_COLUMNS = ["fqn", "kind", "dtype", "shape", "chunk_offsets", "chunk_sizes", "file", "offset", "length", "checksum",
                 "component", "gap_offset", "gap_length"]


# --- listing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint directory under an output_dir, as ``dcp-forge ls`` shows it."""

    path: str
    name: str
    state: str  # "committed", "legacy" (plain DCP) or "partial" (never committed: invisible to loads)
    step: int | None
    size_bytes: int | None
    time: float | None  # commit time (committed), claim time (partial), .metadata mtime (legacy)
    tier: str | None = None  # from the copy's _TIER record: "local: node 0 of 2", "remote (drained copy)"


def _step_of(name: str, extra: Mapping[str, Any] | None) -> int | None:
    step = (extra or {}).get("step")
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    match = _STEP_RE.search(name)
    return int(match.group(1)) if match else None


def _dir_bytes(backend: StorageBackend, path: str) -> int:
    try:
        return sum(int(e.get("size") or 0) for e in backend.fs.ls(path, detail=True) if e.get("type") == "file")
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _claim_time(backend: StorageBackend, path: str) -> float | None:
    try:
        return float(json.loads(backend.read_bytes(backend.join(path, CLAIM_FILE)))["claimed_at"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _looks_like_a_checkpoint(backend: StorageBackend, path: str) -> bool:
    """A directory some save wrote into (other directories under output_dir are not checkpoints)."""
    ours = {CLAIM_FILE, MANIFEST_FILE, INDEX_FILE, METADATA_FILE}
    return any(name in ours or name.endswith(DATA_SUFFIX) for name in backend.list_dir(path))


def _tier_of(backend: StorageBackend, path: str) -> str | None:
    """What the copy's ``_TIER`` record says it is (None: an untiered checkpoint, or an unreadable record)."""
    try:
        return TierRecord.from_bytes(backend.read_bytes(backend.join(path, TIER_FILE)), path).describe()
    except (FileNotFoundError, IntegrityError):
        return None


def list_checkpoint_entries(output_dir: str | os.PathLike, storage_options: Mapping[str, Any] | None = None,
                            *, include_partial: bool = True) -> list[CheckpointEntry]:
    """Every checkpoint directory under ``output_dir``, oldest first (partial ones last if untimed). A tiered
    checkpoint's copy (a node's part of the local tier, a drained remote copy) says which in ``tier``."""
    output_dir = os.fspath(output_dir)
    backend, root = open_backend(output_dir, storage_options)
    entries = []
    for name in backend.list_dir(root, dirs_only=True):
        path = backend.join(root, name)
        state = checkpoint_state(backend, path)
        url = join_url(output_dir, name)
        if state is CheckpointState.COMMITTED:
            when: float | None = read_commit(backend, path).committed_at
            try:
                manifest = CheckpointManifest.from_json(backend.read_bytes(backend.join(path, MANIFEST_FILE)))
                size, step = sum(c.size_bytes for c in manifest.components.values()), _step_of(name, manifest.extra)
            except (FileNotFoundError, IntegrityError):
                size, step = None, _step_of(name, None)
            entries.append(CheckpointEntry(url, name, "committed", step, size, when, _tier_of(backend, path)))
        elif state is CheckpointState.LEGACY:
            info = backend.fs.info(backend.join(path, METADATA_FILE))
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
            when = mtime.timestamp() if hasattr(mtime, "timestamp") else (float(mtime) if mtime else None)
            entries.append(CheckpointEntry(url, name, "legacy", _step_of(name, None), _dir_bytes(backend, path), when))
        elif state is CheckpointState.PARTIAL and include_partial and _looks_like_a_checkpoint(backend, path):
            entries.append(CheckpointEntry(url, name, "partial", _step_of(name, None), _dir_bytes(backend, path),
                                           _claim_time(backend, path), _tier_of(backend, path)))
    entries.sort(key=lambda e: (e.time is None, e.time or 0.0, e.name))
    return entries


# --- the item table -------------------------------------------------------------------------------
def _legacy_table(metadata_bytes: bytes, where: str) -> pa.Table:
    """The index columns a plain DCP checkpoint can provide, from its (restricted-unpickled) metadata.

    Plain DCP records no checksums, writers or sharing patterns: those columns are null, and the
    component is the top-level key.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ..format.safe_load import load_dcp_metadata

    metadata = load_dcp_metadata(metadata_bytes, name=f"{where}/{METADATA_FILE}")
    if written_by_dcp_forge(getattr(metadata, "storage_meta", None)):
        raise IntegrityError(stripped_checkpoint_message(where))
    rows: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    for index, info in (metadata.storage_data or {}).items():
        md = metadata.state_dict_metadata.get(index.fqn)
        tensor = md if isinstance(md, TensorStorageMetadata) else None
        offsets = tuple(index.offset or ())
        chunk = next((c for c in tensor.chunks if tuple(c.offsets) == offsets), None) if tensor is not None else None
        values = {
            "component": top_level_key(index.fqn), "pattern": None, "storage_key": top_level_key(index.fqn),
            "fqn": index.fqn, "kind": "tensor" if tensor is not None else "bytes",
            "dtype": str(tensor.properties.dtype) if tensor is not None else None,
            "shape": list(tensor.size) if tensor is not None else None,
            "chunk_offsets": list(offsets) if tensor is not None else None,
            "chunk_sizes": (list(chunk.sizes) if chunk is not None else list(tensor.size)) if tensor is not None else None,
            "file": info.relative_path, "offset": info.offset, "length": info.length, "checksum": None, "rank": None,
        }
        for name, column in rows.items():  # what plain DCP does not record (checksum, data_offset...) is null
            column.append(values.get(name))
    return pa.table(rows, schema=INDEX_SCHEMA)


@dataclass
class OpenCheckpoint:
    """A checkpoint opened for inspection: its state, records and a way to read its item table."""

    url: str
    backend: StorageBackend
    path: str
    state: CheckpointState
    manifest: CheckpointManifest | None = None
    committed_at: float | None = None
    _index_bytes: bytes | None = field(default=None, repr=False)
    _tables: list[pa.Table] = field(default_factory=list, repr=False)  # column sets read so far

    @classmethod
    def open(cls, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> OpenCheckpoint:
        url = os.fspath(url)
        backend, path = open_backend(url, storage_options)
        state = checkpoint_state(backend, path)
        where = redact_url(url)
        if state is CheckpointState.MISSING:
            raise CheckpointNotFoundError(f"no checkpoint at {where}")
        if state is CheckpointState.PARTIAL:
            raise CheckpointNotFoundError(f"{where} was never committed (a save is running or crashed); "
                                          "`dcp-forge ls` lists it as partial")
        opened = cls(url, backend, path, state)
        if state is CheckpointState.COMMITTED:
            # The item table comes from the index: only one the commit marker vouches for (through the
            # manifest) is used. .metadata is not read here, so it is not checked either.
            files = RecordFiles(opened._read(COMMIT_FILE), opened._read(MANIFEST_FILE), None, opened._read(INDEX_FILE))
            manifest, problems = record_problems(files, where, vouched=(INDEX_FILE,))
            raise_if_problems(problems)
            opened.committed_at = read_commit(backend, path).committed_at
            opened.manifest = manifest
            opened._index_bytes = files.index
        return opened

    @property
    def where(self) -> str:
        return redact_url(self.url)

    def _read(self, name: str) -> bytes:
        try:
            return self.backend.read_bytes(self.backend.join(self.path, name))
        except FileNotFoundError as err:
            raise IntegrityError(f"{self.where} is missing {name}") from err

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The item table (index.parquet's schema), restricted to ``columns``.

        Columns are read once: a later call for a subset of what was read is served from memory.
        """
        wanted = list(columns) if columns is not None else list(INDEX_SCHEMA.names)
        for table in self._tables:
            if set(wanted) <= set(table.column_names):
                return table.select(wanted)
        if self._index_bytes is not None:
            try:
                table = read_index_table(self._index_bytes, wanted)
            except (pa.ArrowException, OSError, ValueError) as err:
                raise IntegrityError(f"{self.where}/{INDEX_FILE} is not a readable index: {err}") from err
        else:
            table = _legacy_table(self._read(METADATA_FILE), self.where).select(wanted)
        self._tables.append(table)
        return table

    def read_values(self, fqns: Iterable[str], *, verify: bool = True) -> dict[str, Any]:
        """The stored values of ``fqns`` (whole tensors, assembled from their chunks; other values
        unpickled safely), found through the index and read without DCP's load machinery.

        Each data file is opened through ``open_data_file`` (inside the checkpoint, no symbolic link)
        and each item bounded by its file's size before it is read. A tensor's chunks must tile it
        exactly, and each must hold the dtype and shape its row records. Checksums are verified when
        the index records them (``verify=False`` skips that).
        """
        import torch

        from ..core.tensors import dtype_named, narrow_box, tiling_problem
        from ..format.safe_load import load_object
        from ..storage import packed_tensor, packed_value_zip, read_blob, stored_tensor

        wanted = sorted(set(fqns))
        table = self.table(VALUE_COLUMNS)
        rows = table.filter(pc.is_in(table["fqn"], pa.array(wanted, pa.string()))).to_pylist()
        missing = sorted(set(wanted) - {r["fqn"] for r in rows})
        if missing:
            raise KeyError(f"{self.where} has no item(s) {missing[:5]}")
        tensor_rows: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row["kind"] == "tensor":
                tensor_rows.setdefault(row["fqn"], []).append(row)
        for fqn, chunks in sorted(tensor_rows.items()):
            why = tiling_problem(chunks[0]["shape"] or (), [(r["chunk_offsets"] or [0] * len(r["chunk_sizes"] or ()),
                                                            r["chunk_sizes"] or ()) for r in chunks])
            if why is not None:
                raise IntegrityError(f"{self.where}: tensor {fqn!r} of component {chunks[0]['component']!r} cannot "
                                     f"be read exactly: {why}")
        values: dict[str, Any] = {}
        handles: dict[str, Any] = {}
        try:
            for row in sorted(rows, key=lambda r: (r["file"], r["offset"])):
                fqn = row["fqn"]
                holds = f"{fqn!r} (component {row['component']!r})"
                handle = handles.get(row["file"])
                if handle is None:
                    handle = handles[row["file"]] = open_data_file(self.backend, self.path, row["file"], self.where,
                                                                   holds)
                check_extent(self.where, row["file"], handle.size(), row["offset"], row["length"], holds)
                # The bytes the item owns: its whole range, or a packed item's head and trailer.
                pieces = ([(row["offset"], row["length"])] if row["gap_offset"] is None else
                          [(row["offset"] + start, length)
                           for start, length in own_pieces(row["length"], row["gap_offset"], row["gap_length"])])
                owned = [read_blob(handle, offset, length) for offset, length in pieces]
                if verify and row["checksum"] is not None:
                    hasher = xxhash.xxh3_64()
                    for piece in owned:
                        hasher.update(piece.numpy().data)
                    if hasher.hexdigest() != row["checksum"]:
                        raise IntegrityError(
                            f"{self.where}: checksum mismatch in {row['file']} at byte {row['offset']} for "
                            f"component {row['component']!r} ({row['fqn']!r}): expected {row['checksum']}, "
                            f"found {hasher.hexdigest()}")
                name = f"{row['component']}: {fqn}"
                if row["gap_offset"] is not None:
                    trailer_at = pieces[1][0] - row["offset"]
                    if row["kind"] != "tensor":
                        values[fqn] = load_object(packed_value_zip(owned[0], owned[1], trailer_at, name), name=name)
                        continue
                    chunk = packed_tensor(owned[0], owned[1], trailer_at, dtype_named(row["dtype"] or ""),
                                          tuple(row["chunk_sizes"] or ()), name)
                elif row["kind"] != "tensor":
                    values[fqn] = load_object(owned[0].numpy().tobytes(), name=name)
                    continue
                else:
                    chunk = stored_tensor(owned[0], name)
                if str(chunk.dtype) != row["dtype"] or list(chunk.shape) != list(row["chunk_sizes"] or ()):
                    raise IntegrityError(
                        f"{self.where}: the item of {holds} in {row['file']} at byte {row['offset']} holds a "
                        f"{chunk.dtype} tensor {list(chunk.shape)}; {INDEX_FILE} says a {row['dtype']} tensor "
                        f"{list(row['chunk_sizes'] or ())}")
                whole = values.get(fqn)
                if whole is None:
                    whole = values[fqn] = torch.empty(row["shape"], dtype=chunk.dtype)
                narrow_box(whole, row["chunk_offsets"] or [0] * chunk.dim(), chunk.shape).copy_(chunk)
        finally:
            for handle in handles.values():
                handle.close()
        return values


# --- summaries ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentSummary:
    key: str
    pattern: str | None
    ranks: list[int] | None  # ranks that wrote it
    replicated_across: list[int] | None
    group: str | None
    copies: int
    items: int
    tensors: int
    size_bytes: int
    checksum: str | None


@dataclass(frozen=True)
class CheckpointSummary:
    path: str
    state: str
    world_size: int | None
    timestamp: str | None
    committed_at: float | None
    save_topology: dict[str, Any]
    topology: str | None  # the save topology in words: "world_size=4, nodes=2, pp_group=[[0, 2], [1, 3]]"
    versions: dict[str, str]
    extra: dict[str, Any]
    items: int
    size_bytes: int
    components: list[ComponentSummary]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


def summarize_checkpoint(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
                         ) -> CheckpointSummary:
    """Components (pattern, ranks, replicas, group, size, checksum, item counts), topology, versions."""
    ckpt = OpenCheckpoint.open(url, storage_options)
    table = ckpt.table(["component", "storage_key", "kind", "length", "gap_length"])
    # The bytes each item owns: a packed item's range includes other items' bytes (its gap).
    table = table.append_column("owned", pc.subtract(table["length"], pc.fill_null(table["gap_length"], 0)))
    counts = table.group_by("component").aggregate([("owned", "sum"), ("owned", "count"), ("storage_key", "count_distinct")])
    tensors = table.filter(pc.equal(table["kind"], "tensor")).group_by("component").aggregate([("kind", "count")])
    per_component = {row["component"]: row for row in counts.to_pylist()}
    tensor_counts = {row["component"]: row["kind_count"] for row in tensors.to_pylist()}
    manifest = ckpt.manifest
    components = []
    for key in sorted(per_component):
        stats = per_component[key]
        comp = manifest.components.get(key) if manifest is not None else None
        components.append(ComponentSummary(
            key=key, pattern=comp.sharing_pattern if comp else None, ranks=comp.ranks if comp else None,
            replicated_across=comp.replicated_across if comp else None, group=comp.group_name if comp else None,
            copies=stats["storage_key_count_distinct"], items=stats["owned_count"],
            tensors=tensor_counts.get(key, 0), size_bytes=stats["owned_sum"],
            checksum=comp.checksum if comp else None))
    return CheckpointSummary(
        path=ckpt.where, state=ckpt.state.value,
        world_size=manifest.world_size if manifest else None,
        timestamp=manifest.timestamp.isoformat() if manifest else None, committed_at=ckpt.committed_at,
        save_topology=dict(manifest.topology) if manifest else {},
        topology=manifest.describe_topology() if manifest else None, versions=dict(manifest.versions) if manifest else {},
        extra=dict(manifest.extra) if manifest else {}, items=table.num_rows,
        size_bytes=sum(c.size_bytes for c in components), components=components)
