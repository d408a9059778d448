"""Who writes what: deduplication and byte balancing over DCP save plans (pure functions).

Two steps, both pure so that an 8-rank job is testable in one process:

1. ``split_large_tensors`` (local, on every rank): a plain tensor big enough to matter is cut into
   row-chunks, each a DCP ``SHARD`` write item. Chunk boundaries depend only on the tensor's shape,
   dtype and the number of ranks holding it, so every holder cuts it the same way.
2. ``assign_writers`` (global, on the coordinator): each unique item (same ``MetadataIndex``) is
   kept on exactly one of the ranks whose plan holds it. Items held by one rank stay there; the rest
   are placed largest first on the least-loaded holder.

Which ranks hold an item follows from the storage keys (keys.py): REPLICATED keys are in every plan,
PER_GROUP keys in their group's plans, PER_NODE keys in their node's, PER_RANK keys in one plan, and
GLOBAL plain values only in rank 0's. So "balanced within the group / node" needs no topology here.

Balance guarantee: every item is placed on a holder that was least loaded when it was placed, so a
rank's final load exceeds the then-lightest holder's by at most that item. When all ranks hold the
same state this gives ``max load <= mean + largest chunk``, inside the 1.05x + one chunk target.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from ..errors import ComponentDeclarationError

# Non-tensor items are pickled later; their size is unknown at plan time. DCP counts them as 1 byte;
# a nominal 1 KiB keeps many small objects from piling onto one rank.
BYTES_ITEM_WEIGHT = 1024

DEFAULT_MIN_CHUNK_BYTES = 16 * 1024 * 1024
DEFAULT_CHUNKS_PER_HOLDER = 4


@dataclasses.dataclass(frozen=True)
class ChunkPolicy:
    """How finely replicated tensors are cut. Part of the plan, so every rank must use the same."""

    min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES
    chunks_per_holder: int = DEFAULT_CHUNKS_PER_HOLDER

    def __post_init__(self) -> None:
        if not isinstance(self.min_chunk_bytes, int) or self.min_chunk_bytes < 1:
            raise ComponentDeclarationError(f"'min_chunk_bytes' must be a positive int (got {self.min_chunk_bytes!r})")
        if not isinstance(self.chunks_per_holder, int) or self.chunks_per_holder < 1:
            raise ComponentDeclarationError(
                f"'chunks_per_holder' must be a positive int (got {self.chunks_per_holder!r})")


def item_bytes(item: WriteItem) -> int:
    """Bytes this item writes: the chunk's, not the full tensor's (DCP's own helper uses the latter)."""
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return BYTES_ITEM_WEIGHT
    td = item.tensor_data
    sizes = td.chunk.sizes if td.chunk is not None else td.size
    return math.prod(sizes) * td.properties.dtype.itemsize


def chunk_boxes(size: Sequence[int], itemsize: int, holders: int,
                policy: ChunkPolicy = ChunkPolicy()) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Cut a tensor of ``size`` into (offsets, sizes) boxes for ``holders`` writers.

    Whole tensor if small; otherwise about ``chunks_per_holder`` pieces per holder, none smaller than
    ``min_chunk_bytes``, cut along dim 0 (contiguous in memory) unless dim 0 is too short.
    """
    size = tuple(int(s) for s in size)
    whole = [((0,) * len(size), size)]
    total = math.prod(size) * itemsize
    if not size or total < 2 * policy.min_chunk_bytes:
        return whole
    pieces = min(max(1, holders) * policy.chunks_per_holder, total // policy.min_chunk_bytes)
    dim = next((d for d, s in enumerate(size) if s >= pieces), max(range(len(size)), key=lambda d: size[d]))
    # Whole rows only, and no piece under min_chunk_bytes (the smallest piece gets the fewest rows).
    row_bytes = total // size[dim]
    min_rows = -(-policy.min_chunk_bytes // row_bytes)
    pieces = min(pieces, size[dim] // min_rows)
    if pieces <= 1:
        return whole
    base, extra = divmod(size[dim], pieces)
    boxes = []
    start = 0
    for p in range(pieces):
        length = base + (1 if p < extra else 0)
        offsets = tuple(start if d == dim else 0 for d in range(len(size)))
        sizes = tuple(length if d == dim else s for d, s in enumerate(size))
        boxes.append((offsets, sizes))
        start += length
    return boxes


def split_large_tensors(plan: SavePlan, holders_of: Callable[[str], int],
                        policy: ChunkPolicy = ChunkPolicy()) -> SavePlan:
    """Replace each big plain-tensor item by row-chunk SHARD items (DTensor shards are left alone).

    ``holders_of(fqn)`` is the number of ranks holding that item's value.
    """
    items: list[WriteItem] = []
    for item in plan.items:
        td = item.tensor_data
        if item.type != WriteItemType.TENSOR or td is None:
            items.append(item)
            continue
        if math.prod(td.size) * td.properties.dtype.itemsize < 2 * policy.min_chunk_bytes:
            items.append(item)  # chunk_boxes keeps it whole: asked without counting its holders
            continue
        boxes = chunk_boxes(td.size, td.properties.dtype.itemsize, holders_of(item.index.fqn), policy)
        if len(boxes) == 1:
            items.append(item)
            continue
        for offsets, sizes in boxes:
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items.append(WriteItem(
                index=MetadataIndex(item.index.fqn, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=chunk, properties=td.properties, size=td.size),
            ))
    return dataclasses.replace(plan, items=items)


def describe_item(item: WriteItem) -> tuple:
    """What every holder of one item must agree on (shape, dtype, chunk box, kind)."""
    td = item.tensor_data
    if td is None:
        return (item.type,)
    chunk = (tuple(td.chunk.offsets), tuple(td.chunk.sizes)) if td.chunk is not None else None
    return (item.type, tuple(td.size), td.properties.dtype, chunk)


# ``(fqn, offset)`` of a MetadataIndex: what DCP's MetadataIndex compares and hashes, as a plain
# tuple. Hashed in C, where a MetadataIndex hashes through a Python method: sets and counts of many
# items key by this. Taken in C too (an attrgetter, not a Python function): a save keys every item
# several times.
index_key: Callable[[MetadataIndex], tuple[str, Any]] = operator.attrgetter("fqn", "offset")
# ``index_key`` of a write item's or a write result's index.
indexed_key: Callable[[Any], tuple[str, Any]] = operator.attrgetter("index.fqn", "index.offset")


def index_order(index: MetadataIndex) -> tuple:
    """How items are ordered where sizes tie: by key, then offsets (plain tuples, comparable)."""
    return (index.fqn, tuple(index.offset) if index.offset is not None else ())


def assign_writers(all_plans: Sequence[SavePlan]) -> list[SavePlan]:
    """Keep every unique item in exactly one plan, balancing bytes over the plans that hold it.

    Deterministic: depends only on the multiset of items per plan, not on their order. Raises
    ComponentDeclarationError if holders of one item disagree on its shape, dtype or chunking.
    """
    # Keyed by index_key: a third of the global plan's time went into hashing MetadataIndex.
    holders: dict[tuple, list[int]] = {}
    first_seen: dict[tuple, tuple[int, WriteItem]] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            idx = item.index
            key = index_key(idx)
            seen = first_seen.get(key)
            if seen is not None:
                other_rank, other = seen
                # Cheap field-wise equality first; describe_item only when they may differ.
                if (other.type != item.type or other.tensor_data != item.tensor_data) and \
                        describe_item(other) != describe_item(item):
                    raise ComponentDeclarationError(
                        f"ranks {other_rank} and {rank} declare {idx.fqn!r} as the same shared state but "
                        f"disagree on it: rank {other_rank} has {describe_item(other)}, rank {rank} has "
                        f"{describe_item(item)}; check that its sharing pattern matches how it is really shared"
                    )
                holders[key].append(rank)
            else:
                first_seen[key] = (rank, item)
                holders[key] = [rank]

    load = [0] * len(all_plans)
    keep: list[set[tuple]] = [set() for _ in all_plans]
    shared: list[tuple[int, tuple, tuple, tuple[int, ...]]] = []
    for key, ranks in holders.items():
        item = first_seen[key][1]
        size = item_bytes(item)
        if len(ranks) == 1:
            load[ranks[0]] += size
            keep[ranks[0]].add(key)
        else:
            shared.append((size, index_order(item.index), key, tuple(ranks)))
    for key, rank in place_on_least_loaded(shared, load).items():
        keep[rank].add(key)

    return [
        dataclasses.replace(plan, items=[it for it in plan.items if (it.index.fqn, it.index.offset) in kept])
        for plan, kept in zip(all_plans, keep, strict=True)
    ]


_Key = TypeVar("_Key", bound=Hashable)


def place_on_least_loaded(items: Sequence[tuple[int, Any, _Key, Sequence[int]]],
                          load: list[int]) -> dict[_Key, int]:
    """Give each ``(size, order, key, candidate ranks)`` item to its least-loaded candidate.

    Largest items first (ties broken by ``order``, so the result does not depend on input order);
    ``load`` holds each rank's bytes so far and is updated in place. Used for writers (save) and
    for readers (read-once load).
    """
    # One lazy min-heap of (load, rank) per distinct candidate set: loads only grow, so a popped entry
    # whose load is stale is re-pushed with the current load until a fresh one surfaces.
    heaps: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    chosen: dict[_Key, int] = {}
    for size, _, key, candidates in sorted(items, key=lambda t: (-t[0], t[1])):
        ranks = tuple(sorted(candidates))
        heap = heaps.get(ranks)
        if heap is None:
            heap = heaps[ranks] = [(load[r], r) for r in ranks]
            heapq.heapify(heap)
        while True:
            entry_load, rank = heapq.heappop(heap)
            if entry_load == load[rank]:
                break
            heapq.heappush(heap, (load[rank], rank))
        load[rank] += size
        chosen[key] = rank
        heapq.heappush(heap, (load[rank], rank))
    return chosen


def plan_loads(plans: Sequence[SavePlan]) -> list[int]:
    """Bytes each plan writes (for tests, benchmarks and the 'who wrote what' report)."""
    return [sum(item_bytes(item) for item in plan.items) for plan in plans]
