"""Who writes what, computed by each rank alone from the items it holds (pure functions).

``placement.assign_writers`` sees every rank's plan at once, on the coordinator. When every rank plans
on its own (planners/derived.py), a rank knows only the items it holds and, from the declarations,
which ranks hold each of them too: its *replica sets* (every rank for REPLICATED state, its group
for PER_GROUP, its node for PER_NODE, the ranks sharing its mesh coordinates for a DTensor shard,
itself for PER_RANK). All members of a set must pick the same writer for each of the set's items,
from what every member knows:

1. the *world set* (items every rank holds) is placed first, from the loads every rank knows alike
   (the GLOBAL values rank 0 alone writes, whose bytes the ranks share when they agree): every rank
   places all of it, so every rank knows every rank's load from it;
2. every other set is then placed over its members, starting from their loads of step 1. A rank
   cannot know the items of a set it is not in, so sets other than the world never see each
   other's loads (nor the items other single ranks hold: PER_RANK state, FSDP shards).

Within a set, items go largest first (ties by their order key) to the least-loaded member (ties
to the lowest rank), exactly as ``placement.place_on_least_loaded`` places them. Guarantee, per set:
when a member got its last item it was the least loaded, so its final load (base plus what the set
gave it) exceeds any member's by at most that item. With only replicated state this is
``assign_writers``' result and bound: max load <= mean + largest chunk.

Work: O(k log k) for a set of k items, plus the members passed over in rank order. Members that
have no load yet all weigh the same, so the lowest of them stands for all of them: the heap holds
only members that got something, and a rank's work grows with its items, not with the world size.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

Key = TypeVar("Key", bound=Hashable)
Item = tuple[int, Any, Key]  # (bytes, order key for ties, item key)


def place_within_set(items: Iterable[Item[Key]], members: Sequence[int], base: Mapping[int, int] | None = None
                     ) -> tuple[dict[Key, int], dict[int, int]]:
    """Give each ``(size, order, key)`` item to the least-loaded of ``members`` (sorted ranks).

    ``base``: loads the members start from (absent: 0). Returns ``(writer of each key, load of each
    member that has one)``; members missing from the loads carry none. Depends only on the items and
    base loads, not on the order items come in.
    """
    base = base or {}
    heap: list[tuple[int, int]] = []  # (load, rank) of every member passed over or given an item
    loads: dict[int, int] = {}
    passed = 0  # members[:passed] are in the heap
    chosen: dict[Key, int] = {}
    for size, _, key in sorted(items, key=lambda item: (-item[0], item[1])):
        # Members not passed yet weigh their base; the first with none stands for all such members
        # (same load, lowest rank), so members with a base before it join the heap first.
        while passed < len(members) and base.get(members[passed], 0) > 0:
            rank = members[passed]
            loads[rank] = base[rank]
            heapq.heappush(heap, (base[rank], rank))
            passed += 1
        fresh = members[passed] if passed < len(members) else None
        if fresh is not None and (not heap or (0, fresh) < heap[0]):
            rank, load = fresh, 0
            passed += 1
        else:
            load, rank = heapq.heappop(heap)
        load += size
        loads[rank] = load
        heapq.heappush(heap, (load, rank))
        chosen[key] = rank
    return chosen, loads


def derive_writers(world_size: int, world_items: Iterable[Item[Key]],
                   other_sets: Iterable[tuple[Sequence[int], Iterable[Item[Key]]]],
                   base: Mapping[int, int] | None = None) -> dict[Key, int]:
    """The writer of every item of the world set and of each ``(members, items)`` set given.

    A rank passes the sets it belongs to; the members of a set, each passing the same set, get the
    same writers for it. A set whose members are the whole world belongs in ``world_items``.
    ``base``: loads every rank knows alike, placed against first (rank 0's GLOBAL values).
    """
    chosen, world_loads = place_within_set(world_items, range(world_size), base)
    for rank, load in (base or {}).items():
        world_loads.setdefault(rank, load)
    for members, items in other_sets:
        chosen.update(place_within_set(items, members, world_loads)[0])
    return chosen
