"""What a checkpoint holds: ``checkpoint_manifest.json`` (the manifest of the declarations, plus topology).

The manifest is small JSON meant for people and tools: one ``ComponentManifest`` per component
(pattern, which ranks wrote it, which ranks share each copy, size, checksum), the save topology,
versions, and the checksums of ``.metadata`` and ``index.parquet`` so a stale or swapped file is
detected. Per-item detail lives in ``index.parquet`` (format/index.py).
"""

from __future__ import annotations

import itertools
import json
import operator
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import xxhash

from ..core.components import ComponentLayout
from ..core.keys import StorageKey, parse_storage_key, top_level_key
from ..core.patterns import SharingPattern
from ..core.topology import Topology
from ..errors import ComponentDeclarationError, IntegrityError, UnsupportedFormatError
from .index import RECORD_FIELDS, IndexColumns, ItemRecord, StoredItem, row_columns

if TYPE_CHECKING:  # torch stays unimported until a save needs it (inspection tools start without it)
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
    from torch.distributed.checkpoint.storage import WriteResult

K = TypeVar("K")  # what a caller keys an item's location by
L = TypeVar("L")  # what a caller records as an item's location

# 2: small items may be packed (format/pack.py): their ranges overlap, and the index's gap columns say
# which bytes of a range its checksum covers. Readers of format 1 would refuse such checksums.
# 3: a pack holds one data.pkl record per dtype and shape, which the other tensors of that dtype and
# shape name in their gap. Readers of format 2 would refuse their trailers.
FORMAT_VERSION = 3


def checksum_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def combine_checksums(checksums: Sequence[str]) -> str:
    """One checksum for a set of items, independent of the order they were written in."""
    return checksum_bytes("\n".join(sorted(checksums)).encode())


@dataclass
class CopyManifest:
    """One stored copy of a component (a PER_RANK component has one per rank, and so on)."""

    holders: list[int]  # ranks that share this copy
    writers: list[int]  # ranks that wrote its bytes
    size_bytes: int
    checksum: str


@dataclass
class ComponentManifest:
    key: str
    sharing_pattern: str
    ranks: list[int]  # ranks that wrote bytes of this component
    replicated_across: list[int] | None  # ranks holding a copy (REPLICATED/PER_GROUP/PER_NODE)
    group_name: str | None
    size_bytes: int = 0
    checksum: str | None = None
    copies: dict[str, CopyManifest] = field(default_factory=dict)  # storage key -> copy

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ComponentManifest:
        data = dict(data)
        data["copies"] = {k: CopyManifest(**v) for k, v in (data.get("copies") or {}).items()}
        return cls(**data)


@dataclass
class CheckpointManifest:
    checkpoint_path: str
    world_size: int
    timestamp: datetime
    components: dict[str, ComponentManifest]
    training_args_hash: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    topology: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # .metadata / index.parquet -> checksum
    extra: dict[str, Any] = field(default_factory=dict)  # caller's data: step, metrics, ...

    def to_json(self) -> str:
        data = asdict(self)
        data["timestamp"] = self.timestamp.isoformat()
        data["format_version"] = FORMAT_VERSION
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> CheckpointManifest:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, found {type(data).__name__}")
            version = data.pop("format_version", FORMAT_VERSION)
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"'format_version' must be a positive int (got {version!r})")
            if version > FORMAT_VERSION:
                raise UnsupportedFormatError(
                    f"manifest format version {version} is newer than this dcp_forge understands "
                    f"({FORMAT_VERSION}); upgrade dcp_forge")
            data["timestamp"] = datetime.fromisoformat(data["timestamp"])
            data["components"] = {k: ComponentManifest.from_json(v) for k, v in data["components"].items()}
            return cls(**data)
        except (ValueError, KeyError, TypeError) as err:
            if isinstance(err, UnsupportedFormatError):
                raise
            raise IntegrityError(f"checkpoint manifest is malformed: {err}") from err

    @property
    def save_topology(self) -> Topology:
        """The job's layout at save time: world size, each rank's node, every named group."""
        return Topology.from_json(self.topology) if self.topology else Topology(rank=0, world_size=self.world_size)

    @property
    def num_nodes(self) -> int:
        return self.save_topology.num_nodes

    @property
    def groups(self) -> dict[str, list[list[int]]]:
        """Named process groups at save time: ``{"pp_group": [[0, 2], [1, 3]]}``."""
        return {name: [list(g) for g in groups] for name, groups in self.save_topology.groups.items()}

    def describe_topology(self) -> str:
        """``world_size=4, nodes=2, pp_group=[[0, 2], [1, 3]]``: the layout the checkpoint was saved from."""
        return self.save_topology.describe()


def versions() -> dict[str, str]:
    import torch

    from .._version import __version__

    return {"dcp_forge": __version__, "torch": torch.__version__, "format": str(FORMAT_VERSION)}


def item_columns_and_locations(metadata: Metadata, results: Sequence[Sequence[WriteResult]],
                               layouts: Mapping[str, ComponentLayout],
                               location: Callable[[MetadataIndex, str, int, int], tuple[K, L]]
                               ) -> tuple[IndexColumns, dict[K, L]]:
    """The index's columns, one value per stored item, joining DCP's metadata with what each writer
    reported, and DCP's ``storage_data``: each item's entry ``location(index, file, offset, length)``
    (its key and value); both from one walk over the results, as a save of many small items pays for
    every walk. Each item's values go into one tuple (no record per item), the tuples are sorted, then
    turned into columns."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ..core.tensors import dtype_text

    saved = metadata.state_dict_metadata
    rows = []
    locations: dict[K, L] = {}
    # (component, pattern) of each storage key: a component's items all share a few keys.
    of_key: dict[str, tuple[str, str]] = {}
    for rank_results in results:
        for result in rank_results:
            info: StoredItem = result.storage_data
            index = result.index
            fqn = index.fqn
            key, locations[key] = location(index, info.relative_path, info.offset, info.length)
            skey = top_level_key(fqn)
            if (known := of_key.get(skey)) is None:
                known = of_key[skey] = (parse_storage_key(skey).component, pattern_of(skey, layouts).value)
            md = saved.get(fqn)
            offsets = tuple(index.offset) if index.offset is not None else None
            if isinstance(md, TensorStorageMetadata):
                kind, dtype, shape = "tensor", dtype_text(md.properties.dtype), tuple(md.size)
                sizes = _chunk_sizes(md, offsets)
            else:
                kind, dtype, shape, sizes = "bytes", None, None, None
            # In RECORD_FIELDS order: the item's record, then the rest as its writer reported it.
            rows.append((known[0], known[1], skey, fqn, kind, dtype, shape, offsets, sizes, *_STORED(info)))
    # Where every fqn is stored once (no tensor in chunks), its name alone orders the rows as
    # _row_order does, and strings compare quicker than tuples.
    distinct = len(set(map(_FQN, rows))) == len(rows)
    rows.sort(key=_FQN if distinct else _row_order)
    return row_columns(rows), locations


# What a writer reported of an item (StoredItem), in RECORD_FIELDS order from "file" on.
_STORED = operator.attrgetter("relative_path", "offset", "length", "checksum", "rank", "data_offset", "key_path",
                              "math_bits", "gap_offset", "gap_length")
_FQN = operator.itemgetter(RECORD_FIELDS.index("fqn"))
_CHUNK_OFFSETS = RECORD_FIELDS.index("chunk_offsets")


def _chunk_sizes(md: TensorStorageMetadata, offsets: tuple[int, ...] | None) -> tuple[int, ...]:
    """The sizes of ``md``'s chunk at ``offsets`` (the whole tensor's if it lists none there)."""
    chunks = md.chunks
    if len(chunks) == 1 and chunks[0].offsets == offsets:  # a whole tensor: its one chunk
        return tuple(chunks[0].sizes)
    chunk = next((c for c in chunks if tuple(c.offsets) == offsets), None)
    return tuple(chunk.sizes) if chunk is not None else tuple(md.size)


def _row_order(row: tuple) -> tuple:
    return (_FQN(row), row[_CHUNK_OFFSETS] or ())


def pattern_of(storage_key: str, layouts: Mapping[str, ComponentLayout]) -> SharingPattern:
    parsed = parse_storage_key(storage_key)
    if parsed.pattern is not None:
        return parsed.pattern
    layout = layouts.get(parsed.component)
    return layout.pattern if layout is not None else SharingPattern.REPLICATED


def component_manifests(records: Sequence[ItemRecord], layouts: Mapping[str, ComponentLayout],
                        topology: Topology) -> dict[str, ComponentManifest]:
    """The manifest of each component ``records`` hold (``component_manifests_of`` their columns)."""
    columns = {name: list(map(operator.attrgetter(name), records)) for name in _MANIFEST_COLUMNS}
    return component_manifests_of(columns, layouts, topology)


# The index columns a component's manifest adds up.
_MANIFEST_COLUMNS = ("storage_key", "rank", "length", "gap_length", "checksum")


def component_manifests_of(columns: Mapping[str, Sequence[Any]], layouts: Mapping[str, ComponentLayout],
                           topology: Topology) -> dict[str, ComponentManifest]:
    """The manifest of each component whose items ``columns`` (the index's columns, at least
    ``_MANIFEST_COLUMNS``) hold."""
    skeys, ranks, lengths, gaps, checksums = (columns[name] for name in _MANIFEST_COLUMNS)
    # Each copy's items as runs of positions: a copy's items mostly come together.
    by_copy: dict[str, list[slice]] = defaultdict(list)
    start = 0
    for skey, run in itertools.groupby(skeys):
        stop = start + len(list(run))
        by_copy[skey].append(slice(start, stop))
        start = stop
    components: dict[str, ComponentManifest] = {}
    for skey in sorted(by_copy):
        runs = by_copy[skey]
        parsed = parse_storage_key(skey)
        pattern = pattern_of(skey, layouts)
        layout = layouts.get(parsed.component)
        group = parsed.group_name or (layout.group_name if layout else None)
        holders = _holders_of_copy(parsed, pattern, topology)
        # Summed in C (a copy may hold thousands of items); the bytes are each item's stored_bytes.
        copy = CopyManifest(
            holders=list(holders), writers=sorted(set(_gathered(ranks, runs))),
            size_bytes=sum(_gathered(lengths, runs)) - sum(filter(None, _gathered(gaps, runs))),
            checksum=combine_checksums(_gathered(checksums, runs)),
        )
        comp = components.setdefault(parsed.component, ComponentManifest(
            key=parsed.component, sharing_pattern=pattern.value, ranks=[], replicated_across=None,
            group_name=group))
        comp.copies[skey] = copy
    for comp in components.values():
        comp.ranks = sorted({w for c in comp.copies.values() for w in c.writers})
        comp.size_bytes = sum(c.size_bytes for c in comp.copies.values())
        comp.checksum = combine_checksums([c.checksum for c in comp.copies.values()])
        if comp.sharing_pattern in (SharingPattern.REPLICATED.value, SharingPattern.PER_GROUP.value,
                                    SharingPattern.PER_NODE.value):
            comp.replicated_across = sorted({h for c in comp.copies.values() for h in c.holders})
    return components


def _gathered(column: Sequence[Any], runs: Sequence[slice]) -> Sequence[Any]:
    """The values of ``column`` in ``runs``, one run after the other."""
    return column[runs[0]] if len(runs) == 1 else [value for run in runs for value in column[run]]


def _holders_of_copy(parsed: StorageKey, pattern: SharingPattern, topology: Topology) -> tuple[int, ...]:
    """The ranks holding the copy stored under ``parsed`` (``pattern``: its component's): a namespaced
    key names them; a plain key is GLOBAL (rank 0's) or REPLICATED (every rank's)."""
    if parsed.rank is not None:
        return (parsed.rank,)
    if parsed.node is not None:
        return topology.ranks_on_node(parsed.node)
    if parsed.group_ranks is not None:
        return tuple(parsed.group_ranks)
    if pattern is SharingPattern.GLOBAL:
        return (0,)
    if pattern is SharingPattern.REPLICATED:
        return tuple(range(topology.world_size))
    raise ComponentDeclarationError(
        f"storage key {str(parsed)!r} has no namespace naming its holders, but component {parsed.component!r} "
        f"is declared {pattern.value}: only GLOBAL and REPLICATED copies are stored under the component key")
