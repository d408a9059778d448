"""Planning a save on every rank by itself, from the declarations: no plan gather and scatter.

DCP plans a save by gathering every rank's local plan on the coordinator, deduplicating and
balancing there, and scattering the final plans back: work and bytes that grow with ranks x items.
dcp_forge's declarations already say who holds what, so every rank computes its own final plan:

- each item of a rank's local plan is held by a *replica set* this rank names alone
  (``HolderSets``): every rank (REPLICATED, and keys nobody declared, as DCP assumes), its group
  (PER_GROUP), its node (PER_NODE), rank 0 (GLOBAL plain values), itself (PER_RANK), and for a
  DTensor shard the ranks of its mesh with the same coordinates on its Shard dimensions (any
  coordinate on Replicate ones; for an empty shard, every coordinate whose shard is empty there);
- the members of each set prove they hold the same items (``PlanSummary.agreement_terms``, summed
  by one all-reduce of a size independent of the world, ``core.agreement``), and each member places
  the set's items the same way (``core.set_placement``);
- after writing, every rank reports what it wrote and, per set, the digest of what the set holds;
  the coordinator proves that every set's items were written exactly once and builds DCP's metadata
  from the reports (``verified_global_plan``), which it gathers to commit anyway.

Items whose holders no rank can name alone (ShardedTensor shards, DTensors placed other than by
Shard/Replicate, ...) make ``summarize`` return why, and the save takes DCP's gather/scatter path.
Pure functions: a 4,096-rank job is testable in one process.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
import marshal
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import numpy as np
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..core.agreement import rank_terms
from ..core.components import ComponentLayout
from ..core.keys import decode_ranks, encode_ranks
from ..core.patterns import SharingPattern
from ..core.placement import index_order, indexed_key, item_bytes
from ..core.set_placement import Item, derive_writers
from ..core.tensors import dtype_text, is_plain_tensor
from ..core.topology import Topology
from ..errors import IncompleteSaveError

ItemKey = tuple[str, Any]  # index_key: (fqn, offsets), as DCP's MetadataIndex compares them
Members = Sequence[int]  # sorted ranks: a range for the whole world, else a tuple


item_key: Callable[[WriteItem], ItemKey] = indexed_key  # index_key of the item's index
_FQN_OF_ITEM = operator.attrgetter("index.fqn")


def items_digest(items: Iterable[WriteItem]) -> bytes:
    """What every member of a set must hold alike: each item's key, kind, shape, dtype and chunk.

    The descriptions are reduced to builtin values and encoded by ``marshal`` version 0, which
    writes values only (no references, no interning marks), so equal items give equal bytes on every
    rank; it is many times quicker than their ``repr``. A value marshal cannot write (a key of
    another type) falls back to the ``repr``."""
    described = sorted(((index_order(item.index), _builtin_description(item)) for item in items), key=itemgetter(0))
    try:
        encoded = b"marshal " + marshal.dumps(described, 0)
    except ValueError:
        encoded = b"repr " + repr(described).encode()
    return hashlib.blake2b(encoded, digest_size=16).digest()


def _builtin_description(item: WriteItem) -> tuple:
    """``describe_item`` in builtin values: the kind's number and the dtype's name. Read from the item
    directly (a set digests every item it holds); test_derived_plans checks that two items' digests
    agree exactly when their ``describe_item`` do."""
    td = item.tensor_data
    if td is None:
        return (item.type.value,)
    chunk = td.chunk
    return (item.type.value, tuple(td.size), dtype_text(td.properties.dtype),
            (tuple(chunk.offsets), tuple(chunk.sizes)) if chunk is not None else None)


def set_name(members: Members) -> bytes:
    """A set's name, the same on every member: its encoded ranks (``0-4095``, ``3-4095:8``)."""
    if isinstance(members, range) and members.step == 1 and len(members) > 1:
        return f"{members.start}-{members.stop - 1}".encode()
    return encode_ranks(members).encode()


class HolderSets:
    """The replica set of each item of one rank's local plan (memoized for one save)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._by_layout: dict[tuple, tuple[bytes, Members]] = {}
        self._by_mesh: dict[tuple, tuple[bytes, Members] | None] = {}

    def _named(self, members: Members) -> tuple[bytes, Members]:
        if len(members) == self.topology.world_size:  # every rank: one world set, however it was found
            members = range(self.topology.world_size)
        return set_name(members), members

    def _declared(self, layout: ComponentLayout | None) -> tuple[bytes, Members]:
        pattern = layout.pattern if layout is not None else SharingPattern.REPLICATED
        group = layout.group_name if layout is not None else None
        memo = (pattern, group)
        found = self._by_layout.get(memo)
        if found is None:
            world = self.topology.world_size
            members = range(world) if pattern is SharingPattern.REPLICATED else self.topology.replica_set(pattern, group)
            found = self._by_layout[memo] = self._named(members)
        return found

    def of(self, item: WriteItem, value: Any, layout: ComponentLayout | None) -> tuple[bytes, Members] | None:
        """``(name, members)`` of the ranks holding ``item`` (``value`` is what it was planned from);
        None if only DCP's gather can tell.

        A DTensor shard is held by the ranks of its mesh with the same piece. Under GLOBAL, that is
        all (one logical value; other meshes hold other keys, as pipeline stages do). Under the other
        patterns the key is shared by the component's replica set, and its members off this rank's
        mesh hold their copy on meshes of their own (tensor parallelism inside data-parallel
        replicas): they are taken to hold the same piece, which the ranks' agreement then proves.
        """
        if item.type != WriteItemType.SHARD or is_plain_tensor(value):  # whole values, and our row-chunks
            return self._declared(layout)
        if not isinstance(value, DTensor) or item.tensor_data is None or item.tensor_data.chunk is None:
            return None
        on_mesh = self._on_mesh(value, item.tensor_data.chunk)
        if on_mesh is None or (layout is not None and layout.pattern is SharingPattern.GLOBAL):
            return on_mesh
        declared = self._declared(layout)
        memo = ("copies", on_mesh[0], declared[0], id(value.device_mesh))
        found = self._by_mesh.get(memo)
        if found is None:
            mesh_ranks = set(value.device_mesh.mesh.flatten().tolist())
            same_piece = set(on_mesh[1])
            found = self._by_mesh[memo] = self._named(
                tuple(r for r in declared[1] if r not in mesh_ranks or r in same_piece))
        return found

    def _on_mesh(self, value: DTensor, chunk: ChunkStorageMetadata) -> tuple[bytes, Members] | None:
        """The ranks of ``value``'s mesh whose shard of it (``chunk``) has the same offsets as this rank's.

        Placed by ``Shard`` / ``Replicate`` only (others: None). A non-empty piece of a dimension
        starts where no other piece does, so the holders share this rank's coordinates on the mesh
        dimensions sharding it; an empty one starts at the dimension's end (DTensor's rule), like
        every other empty piece of it, so the holders are the coordinates whose piece is empty too.
        """
        mesh, placements = value.device_mesh, tuple(value.placements)
        shape = tuple(value.shape)
        empty = tuple((d, shape[d]) for d in range(len(shape)) if chunk.sizes[d] == 0)
        memo = (id(mesh), placements, empty)
        if memo in self._by_mesh:
            return self._by_mesh[memo]
        found = None
        coordinate = mesh.get_coordinate()
        if coordinate is not None and all(isinstance(p, Replicate) or type(p) is Shard for p in placements):
            ranks = np.asarray(mesh.mesh.tolist(), dtype=np.int64)
            coordinates = np.indices(ranks.shape).reshape(ranks.ndim, -1)
            holds = np.ones(ranks.size, dtype=bool)
            pieces: dict[int, np.ndarray] = {}  # tensor dim -> piece size along it, per coordinate
            for mesh_dim, placement in enumerate(placements):
                if not isinstance(placement, Shard):  # Replicate, as checked above
                    continue
                if chunk.sizes[placement.dim] > 0:
                    holds &= coordinates[mesh_dim] == coordinate[mesh_dim]
                    continue
                count = ranks.shape[mesh_dim]  # torch.chunk sizes, nested in mesh order
                local = pieces.get(placement.dim, np.full(ranks.size, shape[placement.dim], dtype=np.int64))
                step = -(-local // count)
                begin = step * coordinates[mesh_dim]
                pieces[placement.dim] = np.maximum(0, np.minimum(local, begin + step) - begin)
            for piece in pieces.values():
                holds &= piece == 0
            members = tuple(sorted(int(r) for r in ranks.ravel()[holds]))
            if members and members[-1] < self.topology.world_size and self.topology.rank in members:
                found = self._named(members)
        self._by_mesh[memo] = found
        return found


@dataclasses.dataclass(frozen=True)
class SetShare:
    """One replica set as one of its members sees it."""

    name: bytes
    members: Members
    position: int  # this rank's place among the members
    items: tuple[WriteItem, ...]  # every item the set holds

    @property
    def size(self) -> int:
        return len(self.members)

    @functools.cached_property
    def digest(self) -> bytes:
        """``items_digest`` of the set's items, taken when first asked: a set this rank alone holds
        needs none when its report stays in this process (``PlanSummary.commit_report``)."""
        return items_digest(self.items)


@dataclasses.dataclass(frozen=True)
class CommitReport:
    """What one rank tells the coordinator after writing: its final plan (the items it wrote, and the
    flattening paths of their keys), each set it is in as ``(name, size, position, digest)``, and
    for each written item the index of its set. The digest is None for a set the coordinator alone
    holds, in a report that never leaves its process: the very items it summarized vouch for it."""

    plan: SavePlan
    sets: tuple[tuple[bytes, int, int, bytes | None], ...]
    item_sets: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PlanSummary:
    """Who holds each item of one rank's local plan: what derived planning needs from that rank."""

    rank: int
    world_size: int
    sets: tuple[SetShare, ...]
    set_of_item: Mapping[ItemKey, int]  # item key -> index into sets

    def agreement_terms(self) -> list[int]:
        """This rank's addition to the all-reduce proving every set's members hold the same items."""
        return rank_terms((s.name, s.position, s.size, s.digest) for s in self.sets if s.size > 1)

    def writers(self, base: Mapping[int, int] | None = None) -> dict[ItemKey, int]:
        """The writer of every item of this rank's sets held by more than one rank (the same on every
        member of a set, once the sets are proven to agree); ``base``: bytes ranks write besides, known
        to every rank alike (the coordinator's GLOBAL values)."""
        world_items: list[Item[ItemKey]] = []
        others: list[tuple[Members, list[Item[ItemKey]]]] = []
        for share in self.sets:
            if share.size == 1:
                continue
            placed = [(item_bytes(it), index_order(it.index), item_key(it)) for it in share.items]
            if share.size == self.world_size:
                world_items = placed
            else:
                others.append((share.members, placed))
        return derive_writers(self.world_size, world_items, others, base)

    def final_plan(self, local_plan: SavePlan, base: Mapping[int, int] | None = None) -> SavePlan:
        """The items of ``local_plan`` this rank writes (call once the sets are proven to agree)."""
        if all(share.size == 1 for share in self.sets):  # this rank alone holds each of its items
            return dataclasses.replace(local_plan, items=list(local_plan.items))
        writer = self.writers(base)
        mine = [item for item in local_plan.items
                if self.sets[self.set_of_item[item_key(item)]].size == 1 or writer[item_key(item)] == self.rank]
        return dataclasses.replace(local_plan, items=mine)

    def commit_report(self, final_plan: SavePlan, in_process: bool = False) -> CommitReport:
        """``in_process``: the report reaches the coordinator's ``verified_global_plan`` as this very
        object (this rank is the coordinator and nothing is pickled on the way), given this summary's
        sets as ``digested``: the sets this rank alone holds then go without a digest."""
        written = set(map(_FQN_OF_ITEM, final_plan.items))
        paths = final_plan.planner_data or {}
        if not paths.keys() <= written:  # keep only the paths of written items
            paths = {fqn: path for fqn, path in paths.items() if fqn in written}
        return CommitReport(
            plan=dataclasses.replace(final_plan, planner_data=dict(paths), storage_data=None),
            sets=tuple((s.name, s.size, s.position, None if in_process and s.size == 1 else s.digest)
                       for s in self.sets),
            item_sets=tuple(map(self.set_of_item.__getitem__, map(item_key, final_plan.items))))


def summarize(local_plan: SavePlan, holders: Callable[[WriteItem], tuple[bytes, Members] | None],
              rank: int, world_size: int) -> PlanSummary | str:
    """The replica sets of ``local_plan``'s items, or why some item's holders cannot be named here."""
    items_of: dict[bytes, list[WriteItem]] = {}
    members_of: dict[bytes, Members] = {}
    for item in local_plan.items:
        found = holders(item)
        if found is None:
            return (f"the holders of {item.index.fqn!r} ({type(item.type).__name__}.{item.type.name}) can only be "
                    "learnt from every rank's plan")
        name, members = found
        members_of.setdefault(name, members)
        items_of.setdefault(name, []).append(item)
    sets = []
    set_of_item: dict[ItemKey, int] = {}
    for index, (name, items) in enumerate(sorted(items_of.items())):
        members = members_of[name]
        position = bisect.bisect_left(members, rank)
        if position == len(members) or members[position] != rank:
            return f"rank {rank} holds {items[0].index.fqn!r} but is not among its holders {encode_ranks(members)}"
        sets.append(SetShare(name, members, position, tuple(items)))
        set_of_item.update(zip(map(item_key, items), itertools.repeat(index)))
    return PlanSummary(rank, world_size, tuple(sets), set_of_item)


def verified_global_plan(reports: Sequence[CommitReport], world_size: int, where: str,
                         digested: Sequence[SetShare] = ()) -> tuple[list[SavePlan], Metadata]:
    """Every rank's final plan and the checkpoint's metadata, from every rank's report (coordinator).

    Raises IncompleteSaveError unless every set was reported by each of its members, all of them
    with the same digest, and the items written for it are exactly the set's items, each once.
    ``digested``: the coordinator's own summary's sets; where the items written for such a set are
    those very item objects, in its order, they are the items it holds: their digest is that set's
    (not taken again), and a set it alone holds needs no digest in its report (``commit_report``).
    A report without a digest for any other set is refused.
    """
    problems = []
    if len(reports) != world_size:
        problems.append(f"{len(reports)} rank(s) reported, the save has {world_size}")
    claims: dict[bytes, dict[int, tuple[int, bytes | None]]] = {}
    sizes: dict[bytes, int] = {}
    written: dict[bytes, list[WriteItem]] = {}
    for rank, report in enumerate(reports):
        for name, size, position, digest in report.sets:
            if sizes.setdefault(name, size) != size or position in claims.setdefault(name, {}):
                problems.append(f"rank {rank} reports the set of ranks {name.decode()} inconsistently")
            claims[name][position] = (rank, digest)
        if len(report.item_sets) != len(report.plan.items) or any(
                not 0 <= i < len(report.sets) for i in report.item_sets):
            problems.append(f"rank {rank}'s report does not say which ranks hold each item it wrote")
            continue
        if len(set(report.item_sets)) == 1:  # every item of one set (one rank's whole plan): no walk per item
            written.setdefault(report.sets[report.item_sets[0]][0], []).extend(report.plan.items)
            continue
        for item, set_index in zip(report.plan.items, report.item_sets, strict=True):
            written.setdefault(report.sets[set_index][0], []).append(item)
    if len(written) > 1:  # with one set, no item can have been written for two
        problems += _written_for_two_sets(written)
    own = {share.name: share for share in digested}
    for name, by_position in sorted(claims.items()):
        members = decode_ranks(name.decode())
        if [by_position.get(p, (None,))[0] for p in range(len(members))] != list(members):
            problems.append(f"the ranks holding the same state as {name.decode()} did not all report it "
                            f"(reported by {sorted(r for r, _ in by_position.values())})")
            continue
        digests = {digest for _, digest in by_position.values()}
        got = written.get(name, [])
        share = own.get(name)
        if len(digests) != 1:
            problems.append(f"ranks {name.decode()} hold different items under the same declaration")
            continue
        claimed = digests.pop()
        if share is not None and _same_objects(got, share.items):  # the coordinator's own items
            exact = claimed is None or claimed == share.digest
        else:
            exact = claimed is not None and claimed == items_digest(got)
        if not exact:
            twice = sorted(f"{k[0]}" for k, n in Counter(item_key(i) for i in got).items() if n > 1)
            problems.append(f"the {len(got)} item(s) written for ranks {name.decode()} are not exactly what they "
                            f"hold" + (f" (written twice: {twice[:3]})" if twice else " (an item is missing)"))
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise IncompleteSaveError(f"not committing checkpoint {where}: {shown}")
    plans = [report.plan for report in reports]
    global_plan, metadata = create_default_global_save_plan(plans, rewrite_index_hints=False)
    return global_plan, dataclasses.replace(metadata, planner_data=merged_paths(plans))


def _written_for_two_sets(written: Mapping[bytes, Sequence[WriteItem]]) -> list[str]:
    """Each item written for two sets, each of which holds it as its only copy."""
    problems = []
    holders_of: dict[ItemKey, bytes] = {}
    for name, items in written.items():
        for item in items:
            other = holders_of.setdefault(item_key(item), name)
            if other != name:  # e.g. a GLOBAL DTensor whose copies live on separate device meshes
                problems.append(
                    f"{item.index.fqn!r} (offsets {tuple(item.index.offset or ())}) was written by ranks "
                    f"{other.decode()} and by ranks {name.decode()}, which each hold it as the only copy: a "
                    "DTensor kept on several device meshes (tensor parallelism inside data-parallel replicas) "
                    "is one copy per replica: declare it PER_GROUP over the ranks holding the same shard")
    return problems


def _same_objects(items: Sequence[WriteItem], others: Sequence[WriteItem]) -> bool:
    """Whether ``items`` are the very objects ``others`` are, in the same order: then they describe
    the same items (a WriteItem is frozen, and nothing edits its tensor data once planned)."""
    return len(items) == len(others) and all(map(operator.is_, items, others))


def merged_paths(plans: Sequence[SavePlan]) -> dict[str, Any]:
    """Every plan's flattening paths in one map, the first plan's winning, as DCP merges them. (DCP
    builds ``dict(ChainMap(*maps))``, which looks each key up map after map: quadratic in ranks.)"""
    merged: dict[str, Any] = {}
    for plan in reversed(plans):
        merged.update(plan.planner_data or {})
    return merged
