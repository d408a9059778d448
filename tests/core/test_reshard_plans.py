"""N -> M load planning in one process, for every N, M up to 8: every destination byte is read exactly
once, from the right place, and a read-once schedule reads each stored item from storage once."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from dcp_forge.core.keys import top_level_key
from dcp_forge.core.topology import Topology
from dcp_forge.loading import decide_loads
from dcp_forge.storage import open_backend
from dcp_forge.storage.read_once import Location, plan_read_once, read_once_by_default
from tests.support.strategies import ReshardCase, load_plans, reshard_cases, save_metadata

SETTINGS = settings(max_examples=120, deadline=None)


def _plan(case: ReshardCase):
    metadata = save_metadata(case)
    saved_keys = {top_level_key(f) for f in metadata.state_dict_metadata}
    key_maps = []
    for rank in range(case.current.world_size):
        decision = decide_loads(case.components(), saved_keys, case.saved, case.current.with_rank(rank),
                                strict=True, path="mem")
        key_maps.append(dict(decision.key_map))
    return metadata, key_maps, load_plans(case, metadata, key_maps)


def _box(offsets, sizes):
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))


@SETTINGS
@given(reshard_cases())
def test_every_destination_byte_is_read_exactly_once_from_the_same_global_position(case):
    metadata, key_maps, plans = _plan(case)
    for rank, plan in enumerate(plans):
        state = case.state(rank, loading=True)
        expected_copy = key_maps[rank]["pr"]
        component_of = {storage: component for component, storage in key_maps[rank].items()}
        by_dest = defaultdict(list)  # "<component>.<key>" -> read items
        for item in plan.items:
            storage, _, rest = item.storage_index.fqn.partition(".")
            assert item.dest_index.fqn == item.storage_index.fqn  # the planner names state by storage key
            by_dest[f"{component_of[storage]}.{rest}"].append(item)
        for fqn, dtensor in state["w"].items():
            chunk = dtensor.__create_chunk_list__()[0]
            cover = np.zeros(tuple(chunk.sizes), dtype=np.int32)
            md = metadata.state_dict_metadata[f"w.{fqn}"]
            for item in by_dest.get(f"w.{fqn}", []):
                cover[_box(item.dest_offsets, item.lengths)] += 1
                stored = next(c for c in md.chunks if tuple(c.offsets) == tuple(item.storage_index.offset))
                # the bytes come from inside the stored chunk, at the same global coordinates
                for d in range(len(md.size)):
                    assert item.storage_offsets[d] >= 0 and item.storage_offsets[d] + item.lengths[d] <= stored.sizes[d]
                    assert stored.offsets[d] + item.storage_offsets[d] == chunk.offsets[d] + item.dest_offsets[d]
            assert (cover == 1).all(), f"rank {rank}: w.{fqn} local shard {chunk} not covered exactly once"
        for fqn, shape in case.replicated.items():
            cover = np.zeros(shape, dtype=np.int32)
            for item in by_dest[f"rep.{fqn}"]:
                cover[_box(item.dest_offsets, item.lengths)] += 1
            assert (cover == 1).all(), f"rank {rank}: rep.{fqn} not covered exactly once"
        assert len(by_dest["pr.x"]) == 1 and len(by_dest["pr.step"]) == 1
        assert isinstance(metadata.state_dict_metadata[f"{expected_copy}.step"], BytesStorageMetadata)


def _needs(metadata, plans):
    """Give every stored item a location (as a storage layer would) and list what each rank needs."""
    location = {}
    for fqn, md in metadata.state_dict_metadata.items():
        chunks = md.chunks if isinstance(md, TensorStorageMetadata) else [None]
        for chunk in chunks:
            size = 16 if chunk is None else max(1, math.prod(chunk.sizes)) * md.properties.dtype.itemsize
            offset = tuple(chunk.offsets) if chunk is not None else None
            location[(fqn, offset)] = Location(f"f{len(location) % 3}", len(location) * 1000, size)
    return [[location[(i.storage_index.fqn, tuple(i.storage_index.offset) if i.storage_index.offset is not None
                       else None)] for i in plan.items] for plan in plans]


@SETTINGS
@given(reshard_cases(), st.sampled_from([2, 3]), st.sampled_from([1, 100, 1 << 20]), st.sampled_from([1, 300, 1 << 20]))
def test_read_once_reads_each_shared_item_once_and_delivers_it_to_every_rank_that_needs_it(case, min_replicas,
                                                                                          batch_bytes, wave_bytes):
    metadata, _, plans = _plan(case)
    needs = _needs(metadata, plans)
    schedules = plan_read_once(needs, min_replicas=min_replicas, batch_bytes=batch_bytes, wave_bytes=wave_bytes)
    batches = schedules[0].batches
    assert all(s.batches == batches for s in schedules)  # one order, known to every rank
    waves = defaultdict(list)
    for batch in batches:
        waves[batch.wave].append(batch)
    assert [b.wave for b in batches] == sorted(b.wave for b in batches)
    assert all(len(w) == 1 or sum(b.nbytes for b in w) <= wave_bytes for w in waves.values())
    received = defaultdict(list)
    for batch in batches:
        assert batch.source not in batch.receivers and batch.receivers
        assert len(batch.locations) == 1 or batch.nbytes <= batch_bytes
        for loc in batch.locations:
            assert loc in schedules[batch.source].reads  # a source sends only what it read
            for r in batch.receivers:
                received[r].append(loc)
    needers = defaultdict(set)
    for rank, locs in enumerate(needs):
        for loc in locs:
            needers[loc].add(rank)
    for rank, locs in enumerate(needs):
        got = list(schedules[rank].reads) + received[rank]
        assert sorted(got) == sorted(set(locs)), f"rank {rank} gets each needed item exactly once"
    readers = defaultdict(int)
    for s in schedules:
        for loc in s.reads:
            readers[loc] += 1
    for loc, ranks in needers.items():
        assert readers[loc] == (1 if len(ranks) >= min_replicas else len(ranks))
    if min_replicas == 2:  # read once, at plan level: storage serves exactly the unique needed bytes
        assert sum(loc.length for s in schedules for loc in s.reads) == sum(loc.length for loc in needers)


def test_read_once_is_automatic_where_it_saves_storage_traffic(tmp_path):
    local, _ = open_backend(tmp_path)
    remote, _ = open_backend("memory://bucket/run")  # any fsspec backend: every read is a request
    assert not read_once_by_default(Topology.single(), remote)
    assert not read_once_by_default(Topology.uniform(0, 4), local)  # one node: the page cache is shared
    assert read_once_by_default(Topology.uniform(0, 4, ranks_per_node=2), local)
    assert read_once_by_default(Topology.uniform(0, 2), remote)
