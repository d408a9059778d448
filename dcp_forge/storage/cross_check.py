"""Do a checkpoint's records describe the same items? The cross-checks shared by loading and ``verify``.

The checksum chain (consistency.py) proves that no record changed since the commit; it cannot prove
that the records were right, nor that a record edited *and re-sealed* (every checksum recomputed)
still agrees with the others. Loading trusts none of them alone:

- every stored location a load reads is the one ``index.parquet`` records for that very item (the
  row found by the location must be the row of the item's fqn and chunk, with the same length,
  kind, dtype, shape and chunk box), so swapping two locations in ``.metadata`` is refused;
- the stored chunks of every tensor a load fills tile it exactly (no gap leaves an element at its
  fresh value, no overlap writes one twice), checked before anything is read;
- the manifest agrees with the index (components, patterns, copies, the ranks that hold and wrote
  each copy, sizes, checksums) and with its own topology, so a manifest edited to another world size
  is refused.

Each check collects ``Problem``s: ``verify`` reports them all, loading raises the first.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem
from torch.distributed.tensor import DTensor

from ..core.components import ComponentLayout
from ..core.keys import NAMESPACE_SEP, parse_storage_key, top_level_key
from ..core.patterns import SharingPattern
from ..core.tensors import dtype_text, one_whole_chunk, tiling_problem
from ..core.topology import Topology
from ..errors import ComponentDeclarationError
from ..format.index import ItemRecord
from ..format.manifest import CheckpointManifest, component_manifests
from ..format.names import INDEX_FILE, MANIFEST_FILE, METADATA_FILE
from .consistency import Problem, ProblemKind, component_of

# --- tensors are tiled by their chunks -------------------------------------------------------------


def holds_part(fqn: str) -> bool:
    """Whether ``fqn`` belongs to one copy of a component (a PER_RANK / PER_NODE / PER_GROUP storage
    key), whose tensors may be stored in part: such a copy holds the chunks its ranks hold, which for a
    DTensor sharded beyond them is part of it (DP x TP keeps one copy per tensor-parallel shard). Any
    other tensor is one logical value, stored whole."""
    return NAMESPACE_SEP in top_level_key(fqn)


def coverage_problems(metadata: Metadata, fqns: Iterable[str], where: str) -> list[Problem]:
    """The tensors among ``fqns`` whose stored chunks do not tile them exactly once (a tensor of a
    copy that ``holds_part`` of it: whose chunks reach outside it or overlap)."""
    found = []
    saved = metadata.state_dict_metadata
    for fqn in fqns if isinstance(fqns, Mapping) else set(fqns):  # a mapping's keys are distinct already
        md = saved.get(fqn)
        if not isinstance(md, TensorStorageMetadata):
            continue
        chunks = md.chunks
        # How unsharded tensors are stored: their one chunk is the tensor (tiling_problem's own first
        # answer, asked without building its boxes).
        if len(chunks) == 1 and one_whole_chunk(md.size, chunks[0].offsets, chunks[0].sizes):
            continue
        why = tiling_problem(md.size, [(c.offsets, c.sizes) for c in md.chunks], whole=not holds_part(fqn))
        if why is not None:
            found.append((fqn, why))
    problems = []
    for fqn, why in sorted(found):  # in key order (only the tensors with a problem are sorted)
        component = component_of(fqn)
        problems.append(Problem(
            ProblemKind.INCOMPLETE, f"{where}/{METADATA_FILE}: tensor {fqn!r} of component {component!r} "
            f"cannot be loaded exactly: {why}", METADATA_FILE, component))
    return problems


def unfilled_problems(metadata: Metadata, items: Iterable[ReadItem], destinations: Mapping[str, Any],
                      where: str) -> list[Problem]:
    """The destination tensors a load plan does not fill completely, among the stored tensors of a
    copy that ``holds_part`` of them (a whole tensor's tiling already proves its destinations filled;
    a key the checkpoint lacks is the planner's to refuse or skip).

    The stored chunks do not overlap (``coverage_problems``), so the plan's reads into a destination
    are disjoint and fill it exactly when their volumes add up to the part this rank holds.
    """
    parts = [fqn for fqn in destinations if holds_part(fqn)]
    if not parts:  # every stored tensor is whole: its tiling proves it filled
        return []
    filled: dict[str, int] = defaultdict(int)
    for item in items:
        if item.type != LoadItemType.BYTE_IO:
            filled[item.dest_index.fqn] += math.prod(item.lengths)
    problems = []
    for fqn, value in sorted(destinations.items()):
        stored = metadata.state_dict_metadata.get(fqn)
        if not holds_part(fqn) or not isinstance(value, torch.Tensor) or not isinstance(stored, TensorStorageMetadata):
            continue
        local = value.to_local() if isinstance(value, DTensor) else value
        if filled[fqn] != local.numel():
            component = component_of(fqn)
            problems.append(Problem(
                ProblemKind.INCOMPLETE, f"{where}/{METADATA_FILE}: tensor {fqn!r} of component {component!r} "
                f"cannot be loaded exactly: its stored chunks hold {filled[fqn]} of the {local.numel()} "
                "elements this rank loads", METADATA_FILE, component))
    return problems


# --- each stored location is the index's row for that item -----------------------------------------


class ItemFacts(NamedTuple):
    """What a record says one stored item is."""

    fqn: str
    chunk_offsets: tuple[int, ...]
    kind: str
    dtype: str | None
    shape: tuple[int, ...] | None
    chunk_sizes: tuple[int, ...] | None
    length: int

    def differences(self, other: ItemFacts) -> list[str]:
        return [f"{name} {mine!r} vs {theirs!r}" for name, mine, theirs in zip(self._fields, self, other, strict=True)
                if mine != theirs]


def _record_facts(record: ItemRecord) -> ItemFacts:
    return ItemFacts(record.fqn, tuple(record.chunk_offsets or ()), record.kind, record.dtype,
                     None if record.shape is None else tuple(record.shape),
                     None if record.chunk_sizes is None else tuple(record.chunk_sizes), record.length)


def _agrees(record: ItemRecord, expected: ItemFacts) -> bool:
    """``_record_facts(record) == expected``, field by field without building the record's facts (the
    case of every item of a sound checkpoint)."""
    return (record.fqn == expected.fqn and record.length == expected.length and record.kind == expected.kind
            and record.dtype == expected.dtype and tuple(record.chunk_offsets or ()) == expected.chunk_offsets
            and _same_tuple(record.shape, expected.shape) and _same_tuple(record.chunk_sizes, expected.chunk_sizes))


def _same_tuple(found: Sequence[int] | None, expected: tuple[int, ...] | None) -> bool:
    """``(None if found is None else tuple(found)) == expected``."""
    return found is None if expected is None else found is not None and tuple(found) == expected


class StoredChunk(NamedTuple):
    """A stored tensor chunk as ``.metadata`` describes it: what a reader must find in its blob."""

    dtype: torch.dtype
    sizes: tuple[int, ...]


class ItemCheck:
    """Checks stored locations of one checkpoint against ``.metadata`` and (dcp_forge checkpoints) the
    index rows, which ``records`` holds (None: a plain DCP checkpoint, with no index)."""

    def __init__(self, metadata: Metadata, records: Sequence[ItemRecord] | None, where: str, *,
                 by_location: Mapping[tuple[str, int], ItemRecord] | None = None) -> None:
        """``by_location``: ``records`` by their location, where the caller holds that map already."""
        self.metadata = metadata
        self.where = where
        self._by_location = None if records is None else (
            by_location if by_location is not None else {r.location: r for r in records})
        self._chunks: dict[str, dict[tuple[int, ...], ChunkStorageMetadata]] = {}

    def chunk(self, index: MetadataIndex) -> StoredChunk | None:
        """The chunk ``index`` names, as ``.metadata`` describes it (None for non-tensor items)."""
        md = self.metadata.state_dict_metadata.get(index.fqn)
        return self._chunk_of(md, index) if isinstance(md, TensorStorageMetadata) else None

    def _chunk_of(self, md: TensorStorageMetadata, index: MetadataIndex) -> StoredChunk | None:
        offsets = tuple(index.offset or ())
        if len(md.chunks) == 1:  # most tensors: one chunk, no table of chunks to build
            (chunk,) = md.chunks
            found = chunk if tuple(chunk.offsets) == offsets else None
        else:
            chunks = self._chunks.get(index.fqn)
            if chunks is None:
                chunks = self._chunks[index.fqn] = {tuple(c.offsets): c for c in md.chunks}
            found = chunks.get(offsets)
        return None if found is None else StoredChunk(md.properties.dtype, tuple(found.sizes))

    def problem(self, index: MetadataIndex, info: Any) -> Problem | None:
        """What is wrong with ``.metadata``'s location ``info`` of item ``index``; None when the
        records agree on it."""
        return self.checked(index, info)[0]

    def checked(self, index: MetadataIndex, info: Any) -> tuple[Problem | None, StoredChunk | None]:
        """``problem(index, info)`` and the chunk ``index`` names (``chunk``), found with one lookup.
        (On the load path for every stored item read: the agreeing case is kept to a few lookups and
        one tuple comparison.)"""
        fqn = index.fqn
        md = self.metadata.state_dict_metadata.get(fqn)
        chunk = None
        if isinstance(md, TensorStorageMetadata):
            chunk = self._chunk_of(md, index)
            if chunk is None:
                return self._problem(ProblemKind.INCOMPLETE, index, info, METADATA_FILE, f"stores a chunk of {fqn!r} at "
                                     f"offsets {list(index.offset or ())} in {{at}}, which is none of its chunks"), None
            if not isinstance(chunk.dtype, torch.dtype):
                return self._problem(ProblemKind.MALFORMED, index, info, METADATA_FILE,
                                     f"describes {fqn!r} with dtype {chunk.dtype!r}"), chunk
            nbytes = math.prod(chunk.sizes) * chunk.dtype.itemsize
            if nbytes > info.length:
                return self._problem(ProblemKind.MALFORMED, index, info, METADATA_FILE, f"describes chunk "
                                     f"{list(index.offset or ())} of {fqn!r} as {chunk.dtype} {list(chunk.sizes)} "
                                     f"({nbytes} bytes), which cannot fit in the {info.length} bytes stored in "
                                     "{at}"), chunk
            expected = ItemFacts(fqn, tuple(index.offset or ()), "tensor", dtype_text(chunk.dtype), tuple(md.size),
                                 chunk.sizes, info.length)
        elif isinstance(md, BytesStorageMetadata):
            expected = ItemFacts(fqn, (), "bytes", None, None, None, info.length)
        else:
            return self._problem(ProblemKind.INCOMPLETE if md is None else ProblemKind.MALFORMED, index, info,
                                 METADATA_FILE, f"stores {fqn!r} in {{at}} but describes it as {type(md).__name__}"), None
        if self._by_location is None:
            return None, chunk
        record = self._by_location.get((info.relative_path, info.offset))
        if record is None:
            return self._problem(ProblemKind.INCOMPLETE, index, info, INDEX_FILE,
                                 f"has no row for {fqn!r} stored in {{at}} ({METADATA_FILE} lists it)"), chunk
        if _agrees(record, expected):
            return None, chunk
        found = _record_facts(record)
        return Problem(ProblemKind.INCOMPLETE, f"{self.where}: {INDEX_FILE} and {METADATA_FILE} disagree about the "
                       f"item stored in {info.relative_path} at byte {info.offset} (index vs metadata: "
                       f"{'; '.join(found.differences(expected))}): refusing to load {fqn!r} from it", INDEX_FILE,
                       component_of(fqn)), chunk

    def _problem(self, kind: ProblemKind, index: MetadataIndex, info: Any, file: str, what: str) -> Problem:
        """A problem ``file`` has with one location; ``what`` may say ``{at}`` for the location."""
        what = what.replace("{at}", f"{info.relative_path} at byte {info.offset}")
        return Problem(kind, f"{self.where}/{file} {what}", file, component_of(index.fqn))


# --- the manifest agrees with the index and its own topology ------------------------------------------


def _layouts_of(records: Sequence[ItemRecord]) -> tuple[dict[str, ComponentLayout], list[str]]:
    """Each component's pattern, as the index rows record it (and components whose rows disagree)."""
    patterns: dict[str, set[str]] = defaultdict(set)
    for r in records:
        patterns[r.component].add(r.pattern)
    layouts, mixed = {}, []
    for component, found in sorted(patterns.items()):
        values = sorted(found, key=str)
        try:
            pattern = SharingPattern(values[0]) if len(values) == 1 else None
        except ValueError:
            pattern = None
        if pattern is None:
            mixed.append(f"component {component!r} has rows of pattern(s) {values}")
        else:
            layouts[component] = ComponentLayout(component, pattern)
    return layouts, mixed


def _copy_ranks_problem(skey: str, pattern: SharingPattern, topology: Topology, writers: Sequence[int],
                        holders: Sequence[int]) -> str | None:
    """Why copy ``skey`` cannot have been written by ``writers`` in a job of ``topology``."""
    outside = sorted(r for r in writers if not 0 <= r < topology.world_size)
    if outside:
        return f"it was written by rank(s) {outside}, outside a world of {topology.world_size}"
    parsed = parse_storage_key(skey)
    if pattern is SharingPattern.PER_RANK and not 0 <= (parsed.rank or 0) < topology.world_size:
        return f"it is rank {parsed.rank}'s copy, outside a world of {topology.world_size}"
    if pattern is SharingPattern.PER_NODE and not 0 <= (parsed.node or 0) < topology.num_nodes:
        return f"it is node {parsed.node}'s copy, outside the {topology.num_nodes} node(s) of the topology"
    if pattern is SharingPattern.PER_GROUP and tuple(parsed.group_ranks or ()) not in topology.groups.get(
            parsed.group_name or "", ()):
        return (f"it is the copy of group {parsed.group_name!r} {list(parsed.group_ranks or ())}, which the "
                f"topology does not have ({topology.describe([parsed.group_name or ''])})")
    if pattern in (SharingPattern.PER_RANK, SharingPattern.PER_NODE, SharingPattern.PER_GROUP):
        strangers = sorted(set(writers) - set(holders))
        if strangers:
            return f"rank(s) {strangers} wrote it without holding it (holders: {list(holders)})"
    return None


def manifest_problems(manifest: CheckpointManifest, records: Sequence[ItemRecord], where: str) -> list[Problem]:
    """The manifest is what the index rows and the manifest's own save topology add up to.

    Everything the manifest says about components (pattern, copies, the ranks holding and writing
    each copy, sizes, checksums) is recomputed from the index the way the writer computed it, and
    compared; the topology must be the one its world size states, and every rank, node and group a
    copy names must exist in it.
    """
    def problem(message: str, component: str | None = None) -> Problem:
        return Problem(ProblemKind.INCOMPLETE, f"{where}/{MANIFEST_FILE}: {message}", MANIFEST_FILE, component)

    try:
        topology = manifest.save_topology
    except (ComponentDeclarationError, TypeError, ValueError, KeyError) as err:
        return [Problem(ProblemKind.MALFORMED, f"{where}/{MANIFEST_FILE}: its topology is malformed: {err}",
                        MANIFEST_FILE)]
    problems = []
    if topology.world_size != manifest.world_size:
        problems.append(problem(f"world_size {manifest.world_size} disagrees with its topology "
                                f"({topology.describe()})"))
    layouts, mixed = _layouts_of(records)
    problems += [Problem(ProblemKind.MALFORMED, f"{where}/{INDEX_FILE}: {m}", INDEX_FILE) for m in mixed]
    try:
        expected = component_manifests([r for r in records if r.component in layouts], layouts, topology)
    except (ComponentDeclarationError, ValueError, IndexError) as err:
        return [*problems, problem(f"the index's copies do not fit its topology ({topology.describe()}): {err}")]

    in_index, in_manifest = set(expected), set(manifest.components)
    for component in sorted(in_index ^ in_manifest):
        side = MANIFEST_FILE if component in in_manifest else INDEX_FILE
        problems.append(problem(f"component {component!r} is only in {side} (the manifest and the index must "
                                "list the same components)", component))
    for component in sorted(in_index & in_manifest):
        found, want = manifest.components[component], expected[component]
        for name in ("sharing_pattern", "ranks", "replicated_across", "group_name"):
            if getattr(found, name) != getattr(want, name):
                problems.append(problem(f"component {component!r} records {name} {getattr(found, name)!r}, the index "
                                        f"and topology give {getattr(want, name)!r}", component))
        for skey in sorted(set(found.copies) ^ set(want.copies)):
            side = MANIFEST_FILE if skey in found.copies else INDEX_FILE
            problems.append(problem(f"copy {skey!r} of component {component!r} is only in {side}", component))
        for skey in sorted(set(found.copies) & set(want.copies)):
            copy, computed = found.copies[skey], want.copies[skey]
            why = _copy_ranks_problem(skey, SharingPattern(want.sharing_pattern), topology, computed.writers,
                                      computed.holders)
            if why is not None:
                problems.append(problem(f"copy {skey!r} of component {component!r} does not fit the topology "
                                        f"({topology.describe()}): {why}", component))
            if (copy.holders, copy.writers) != (computed.holders, computed.writers):
                problems.append(problem(
                    f"copy {skey!r} of component {component!r} records holders {copy.holders} and writers "
                    f"{copy.writers}, the index and topology give {computed.holders} and {computed.writers}",
                    component))
            if (copy.size_bytes, copy.checksum) != (computed.size_bytes, computed.checksum):
                problems.append(problem(
                    f"copy {skey!r} of component {component!r} records {copy.size_bytes} bytes with checksum "
                    f"{copy.checksum}, the index adds up to {computed.size_bytes} bytes with checksum "
                    f"{computed.checksum}", component))
        if (found.size_bytes, found.checksum) != (want.size_bytes, want.checksum):
            problems.append(problem(f"component {component!r} records {found.size_bytes} bytes with checksum "
                                    f"{found.checksum}, its copies add up to {want.size_bytes} bytes with checksum "
                                    f"{want.checksum}", component))
    return problems
