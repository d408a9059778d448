"""Storage tiers, the pure parts: where peer copies go and what losing nodes costs, what is committed and
loadable in the local tier given each node's listing, which copy a load tries first, read-once plans
over node-local files, and the item-by-item check every copy of a data file goes through."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcp_forge import IntegrityError, LocalTier
from dcp_forge.core.topology import Topology
from dcp_forge.format.tier_record import LOCAL, REMOTE, TierRecord
from dcp_forge.storage import CommitRecord, ItemVerifier, copy_verified, open_backend
from dcp_forge.storage.read_once import Location, plan_read_once
from dcp_forge.tiers.layout import (
    NodeCopy,
    local_checkpoints,
    node_readers,
    peer_targets,
    peer_transfers,
    plan_uploads,
    retention_victims,
    uncommitted_copies,
)
from dcp_forge.tiers.peer_copy import pieces_by_sender
from dcp_forge.tiers.recovery import RemoteCheckpoint, load_sources
from tests.support.strategies import node_layouts, stored_items


# --- peer copies ---------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(node_layouts(), st.data())
def test_peer_copies_go_to_distinct_other_nodes_and_survive_losing_that_many_nodes(topology, data):
    copies = data.draw(st.integers(0, topology.num_nodes - 1))
    files = {f"__{r}_0.distcp": (r, 100 + r) for r in range(topology.world_size)}
    transfers = peer_transfers(topology, copies, files)
    holders: dict[str, set[int]] = {name: {topology.node_of_rank[writer]} for name, (writer, _) in files.items()}
    for rank in range(topology.world_size):
        targets = peer_targets(topology, rank, copies)
        nodes = [topology.node_of_rank[t] for t in targets]
        assert len(targets) == copies and len(set(nodes)) == copies
        assert topology.node_of_rank[rank] not in nodes
    for t in transfers:
        assert topology.node_of_rank[t.src] != topology.node_of_rank[t.dst] and files[t.file] == (t.src, t.size)
        holders[t.file].add(topology.node_of_rank[t.dst])
    assert all(len(nodes) == copies + 1 for nodes in holders.values())
    lost = set(data.draw(st.lists(st.integers(0, topology.num_nodes - 1), max_size=copies, unique=True)))
    assert all(nodes - lost for nodes in holders.values()), "losing at most peer_copies nodes loses no file"


def test_peer_copies_need_more_nodes_than_copies():
    topology = Topology.uniform(0, 4, ranks_per_node=2)
    with pytest.raises(ValueError, match="peer_copies=2 needs at least 3 nodes"):
        peer_targets(topology, 0, 2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 70)), min_size=1, max_size=8, unique_by=lambda t: t[0]),
       st.integers(1, 32))
def test_each_sender_streams_each_file_once_in_order(files, chunk):
    transfers = peer_transfers(Topology.uniform(0, 4, ranks_per_node=1), 2,
                               {f"__{r}_0.distcp": (r, size) for r, size in files})
    for src, pieces in pieces_by_sender(transfers, chunk).items():
        for name, size in {(p.file, p.file_size) for p in pieces}:
            mine = [p for p in pieces if p.file == name]
            assert [p.offset for p in mine] == list(range(0, size, chunk)) or (size == 0 and len(mine) == 1)
            assert sum(p.length for p in mine) == size and mine[-1].last
            assert all(p.src == src and len(p.dsts) == 2 for p in mine)


# --- the local tier, from listings ---------------------------------------------------------------
def _commit(checkpoint_id: str, save_id: str, at: float) -> CommitRecord:
    return CommitRecord(checkpoint_id, save_id, at, "c0ffee")


def _copy(checkpoint_id: str, node: int, save_id: str, at: float, holds: dict[str, int], *, committed: bool = True,
          all_files: dict[str, int] | None = None, records: bool = True, drain: bool = True) -> NodeCopy:
    tier = TierRecord(LOCAL, checkpoint_id, save_id, all_files or holds, node=node, num_nodes=2, holds=tuple(holds),
                      drain=drain)
    return NodeCopy(checkpoint_id, node, save_id, _commit(checkpoint_id, save_id, at) if committed else None, tier,
                    dict(holds), frozenset({"index.parquet", ".metadata", "checkpoint_manifest.json"}) if records
                    else frozenset())


FILES = {"__0_0.distcp": 10, "__1_0.distcp": 20}


def test_a_checkpoint_is_loadable_from_the_local_tier_when_its_node_copies_hold_every_file():
    copies = [_copy("c-1", 0, "s1", 1.0, {"__0_0.distcp": 10}, all_files=FILES),
              _copy("c-1", 1, "s1", 1.0, {"__1_0.distcp": 20}, all_files=FILES, committed=False)]
    [found] = local_checkpoints(copies)
    assert found.loadable and found.members == (0, 1) and found.record_nodes == (0,)
    assert dict(found.holders) == {"__0_0.distcp": (0,), "__1_0.distcp": (1,)}
    # Node 1 lost its storage: nothing holds __1_0 any more.
    [lost] = local_checkpoints(copies[:1])
    assert not lost.loadable and lost.missing == ("__1_0.distcp",)
    assert "__1_0.distcp are on no node" in lost.why_not_loadable()
    # A file of the wrong size (cut short) is not held.
    cut = [copies[0], _copy("c-1", 1, "s1", 1.0, {"__1_0.distcp": 19}, all_files=FILES, committed=False)]
    assert local_checkpoints(cut)[0].missing == ("__1_0.distcp",)


def test_copies_of_another_save_of_the_same_id_are_never_part_of_a_checkpoint():
    stale = _copy("c-1", 1, "old", 0.5, dict(FILES))  # an earlier run's complete, committed copy
    copies = [_copy("c-1", 0, "new", 1.0, {"__0_0.distcp": 10}, all_files=FILES), stale]
    [found] = local_checkpoints(copies)
    assert found.commit.save_id == "new" and found.members == (0,) and not found.loadable
    partial = NodeCopy("c-2", 1, "s2", None, None, {"__1_0.distcp": 3})
    assert uncommitted_copies([*copies, partial], local_checkpoints([*copies, partial])) == [partial]


def test_uncommitted_node_copies_of_a_committed_save_are_members_not_leftovers():
    member = _copy("c-1", 1, "s1", 1.0, {"__1_0.distcp": 20}, all_files=FILES, committed=False)
    copies = [_copy("c-1", 0, "s1", 1.0, {"__0_0.distcp": 10}, all_files=FILES), member]
    assert uncommitted_copies(copies, local_checkpoints(copies)) == []
    assert uncommitted_copies([member], local_checkpoints([member])) == [member]


def test_local_retention_keeps_the_newest_and_the_checkpoint_being_drained():
    copies = [_copy(f"c-{i}", 0, f"s{i}", float(i), dict(FILES)) for i in range(1, 6)]
    committed = local_checkpoints(copies)
    assert retention_victims(committed, 2) == ["c-1", "c-2", "c-3"]
    assert retention_victims(committed, 2, busy={"c-2"}) == ["c-1", "c-3"]
    assert retention_victims(committed, 9) == []


# --- which copy a load tries -----------------------------------------------------------------------
def _remote(checkpoint_id: str, save_id: str, at: float) -> RemoteCheckpoint:
    return RemoteCheckpoint(checkpoint_id, f"s3://b/run/{checkpoint_id}", _commit(checkpoint_id, save_id, at))


def test_loads_try_the_newest_save_local_copy_first_then_its_remote_copy_then_older_saves():
    local = local_checkpoints([_copy("c-2", 0, "s2", 2.0, dict(FILES)), _copy("c-3", 0, "s3", 3.0, dict(FILES))])
    remote = [_remote("c-1", "s1", 1.0), _remote("c-2", "s2", 2.0)]
    sources, notes = load_sources(local, remote)
    assert [(s.checkpoint_id, s.tier) for s in sources] == [("c-3", LOCAL), ("c-2", LOCAL), ("c-2", REMOTE),
                                                            ("c-1", REMOTE)]
    assert notes == []
    assert [(s.checkpoint_id, s.tier) for s in load_sources(local, remote, "c-2")[0]] == [("c-2", LOCAL),
                                                                                         ("c-2", REMOTE)]


def test_a_newer_remote_checkpoint_wins_over_an_older_local_one():
    local = local_checkpoints([_copy("c-2", 0, "s2", 2.0, dict(FILES))])
    sources, _ = load_sources(local, [_remote("c-7", "s7", 7.0), _remote("c-2", "other", 9.0)])
    assert [(s.checkpoint_id, s.commit.save_id, s.tier) for s in sources] == [
        ("c-2", "other", REMOTE), ("c-7", "s7", REMOTE), ("c-2", "s2", LOCAL)]


def test_a_local_checkpoint_missing_files_falls_back_to_its_remote_copy_and_says_why():
    local = local_checkpoints([_copy("c-3", 0, "s3", 3.0, {"__0_0.distcp": 10}, all_files=FILES),
                               _copy("c-2", 0, "s2", 2.0, dict(FILES))])
    sources, notes = load_sources(local, [_remote("c-3", "s3", 3.0)])
    assert [(s.checkpoint_id, s.tier) for s in sources] == [("c-3", REMOTE), ("c-2", LOCAL)]
    assert len(notes) == 1 and "c-3 is committed in the local tier but cannot be loaded from it" in notes[0]
    assert "__1_0.distcp are on no node" in notes[0] and "loading its remote copy s3://b/run/c-3" in notes[0]
    _, notes = load_sources(local, [])
    assert "it has no remote copy; loading the newest older checkpoint instead" in notes[0]


# --- read-once over node-local files ---------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_read_once_reads_each_item_where_its_file_is_and_delivers_it_to_every_rank_that_needs_it(data):
    world = data.draw(st.integers(1, 6))
    files = [f"__{i}_0.distcp" for i in range(data.draw(st.integers(1, 4)))]
    locations = [Location(f, o * 10, 10) for f in files for o in range(data.draw(st.integers(1, 3)))]
    needs = [data.draw(st.lists(st.sampled_from(locations), unique=True)) for _ in range(world)]
    readers = {f: data.draw(st.sets(st.integers(0, world - 1), min_size=1)) for f in files}
    schedules = plan_read_once(needs, readers=readers, min_replicas=data.draw(st.integers(2, 4)))
    batches = schedules[0].batches
    for rank, schedule in enumerate(schedules):
        got = {loc for b in batches if rank in b.receivers for loc in b.locations}
        assert set(needs[rank]) <= schedule.reads | got, "every needed item arrives"
        assert not got & schedule.reads and got <= set(needs[rank]), "nothing arrives twice or unasked"
        assert all(rank in readers[loc.file] for loc in schedule.reads), "only ranks that can read a file read it"
        sent = {loc for b in batches if b.source == rank for loc in b.locations}
        assert sent <= schedule.reads
    for loc in locations:
        needers = {r for r in range(world) if loc in needs[r]}
        reading = {r for r in range(world) if loc in schedules[r].reads}
        if needers & set(readers[loc.file]):
            assert reading <= needers, "a rank that needs an item reads it when one can"


def test_read_once_refuses_a_file_no_rank_can_read():
    with pytest.raises(ValueError, match="no rank can read data file __1_0.distcp"):
        plan_read_once([[Location("__1_0.distcp", 0, 4)]], readers={"__1_0.distcp": ()})


def test_uploads_go_to_the_writer_where_it_holds_its_file_else_to_a_rank_that_does():
    files = {"__0_0.distcp": (0, 50), "__1_0.distcp": (1, 70), "__2_0.distcp": (2, 10)}
    holders = node_readers({"__0_0.distcp": (0,), "__1_0.distcp": (0,), "__2_0.distcp": (1,)},
                           Topology.uniform(0, 4, ranks_per_node=2))
    uploads = plan_uploads(files, holders, 4)
    assert uploads["__0_0.distcp"] == 0 and uploads["__1_0.distcp"] == 1 and uploads["__2_0.distcp"] in (2, 3)
    with pytest.raises(ValueError, match="no rank can read data file"):
        plan_uploads(files, {}, 4)


# --- copies check every item on the way ------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stored_items(), st.data())
def test_a_copy_becomes_durable_only_if_every_item_matches_its_checksum(tmp_path, item_file, data):
    blob, rows = item_file
    backend, root = open_backend(str(tmp_path))
    source = os.path.join(root, "source.distcp")
    with open(source, "wb") as f:
        f.write(blob)
    target = os.path.join(root, "copy.distcp")
    copied = copy_verified(backend.open_input(source), backend.open_output(target),
                           ItemVerifier("ckpt", "__0_0.distcp", rows, len(blob)), chunk_bytes=data.draw(st.integers(1, 64)))
    with open(target, "rb") as f:
        assert copied == len(blob) and f.read() == blob
    os.unlink(target)
    if not blob:
        return
    flipped = bytearray(blob)
    where = data.draw(st.integers(0, len(blob) - 1))
    flipped[where] ^= 0x01
    with open(source, "wb") as f:
        f.write(bytes(flipped))
    damaged = next(r for r in rows if any(at <= where < at + n for at, n in r.pieces))  # one owner per byte
    with pytest.raises(IntegrityError, match=rf"checksum mismatch in __0_0.distcp at byte {damaged.offset} for "
                                             rf"component 'box' \('{damaged.fqn}'\)"):
        copy_verified(backend.open_input(source), backend.open_output(target),
                      ItemVerifier("ckpt", "__0_0.distcp", rows, len(blob)))
    assert not os.path.exists(target), "a copy that failed its check is discarded"


def test_a_copy_of_the_wrong_length_is_refused(tmp_path):
    backend, root = open_backend(str(tmp_path))
    source = os.path.join(root, "source.distcp")
    with open(source, "wb") as f:
        f.write(b"abcdef")
    with pytest.raises(IntegrityError, match="has 6 bytes, index.parquet records 7"):
        copy_verified(backend.open_input(source), backend.open_output(os.path.join(root, "copy")),
                      ItemVerifier("ckpt", "__0_0.distcp", [], 7))
    assert not os.path.exists(os.path.join(root, "copy"))



@given(stored_items(), st.data())
def test_an_index_whose_items_claim_the_same_bytes_or_bytes_past_the_file_is_refused(item_file, data):
    blob, rows = item_file
    owned = [r for r in rows if r.stored_bytes]
    if owned:  # a second row owning the first bytes of an item: every byte has one owner
        twin = dataclasses.replace(data.draw(st.sampled_from(owned)), fqn="box.twin")
        with pytest.raises(IntegrityError, match=r"items of __0_0.distcp overlap"):
            ItemVerifier("ckpt", "__0_0.distcp", [*rows, twin], len(blob))
    short = len(blob) - 1
    if any(at + n > short for r in rows for at, n in r.pieces):
        with pytest.raises(IntegrityError, match=rf"should have {short} bytes, but index.parquet records an item"):
            ItemVerifier("ckpt", "__0_0.distcp", rows, short)

# --- records and settings --------------------------------------------------------------------------
def test_tier_records_round_trip_and_refuse_malformed_ones():
    record = TierRecord(LOCAL, "c-1", "s1", dict(FILES), node=1, num_nodes=2, holds=("__1_0.distcp",),
                        copies_of=(0,), drain=True)
    assert TierRecord.from_bytes(record.to_bytes(), "x") == record
    assert record.describe() == "local: node 1 of 2, copies of node 0"
    assert TierRecord(REMOTE, "c-1", "s1", dict(FILES)).describe() == "remote (drained copy)"
    for bad in (b"[]", b"{}", b'{"tier": "cloud", "checkpoint_id": "c", "save_id": "s", "data_files": {}}',
                b'{"tier": "local", "checkpoint_id": "c", "save_id": "s", "data_files": {"a": -1}}'):
        with pytest.raises(IntegrityError, match="tier record x is malformed"):
            TierRecord.from_bytes(bad, "x")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"path": ""}, "LocalTier.path must be a non-empty local directory path"),
    ({"path": "s3://bucket/run"}, "must be a node-local directory"),
    ({"path": "/x", "keep": 0}, "LocalTier.keep must be an int >= 1"),
    ({"path": "/x", "peer_copies": -1}, "LocalTier.peer_copies must be an int >= 0"),
    ({"path": "/x", "drain_every": True}, "LocalTier.drain_every must be an int >= 1"),
])
def test_local_tier_settings_validate_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalTier(**kwargs)
