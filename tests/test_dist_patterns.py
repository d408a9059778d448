"""End to end on real gloo process groups: every pattern at world 1, 2 and 4 saves and each rank
loads exactly its own state back; PER_GROUP on a 2x2 DPxPP-like mesh, PER_NODE on 2 nodes x 2."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from dcp_forge import CheckpointCoordinator, SharingPattern, StateComponent, read_manifest
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.storage import join_url

SMALL_CHUNKS = ChunkPolicy(min_chunk_bytes=4096, chunks_per_holder=2)


class Box:
    """A user stateful: a big tensor (chunked when shared), a small one and plain values."""

    def __init__(self, seed: int | None) -> None:
        gen = torch.Generator().manual_seed(seed if seed is not None else 12345)
        fill = seed is not None
        self.state = {
            "big": torch.randn(64, 256, generator=gen) if fill else torch.zeros(64, 256),
            "nested": {"w": torch.arange(10) * (seed or 0) if fill else torch.zeros(10, dtype=torch.int64),
                       "tag": f"seed-{seed}" if fill else "none"},
            "step": seed if fill else -1,
        }

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def _value_id(pattern: SharingPattern, rank: int, world: int, node: int, group: tuple[int, ...]) -> int:
    """Which logical copy a rank holds under ``pattern`` (what it must get back)."""
    return {SharingPattern.GLOBAL: 0, SharingPattern.REPLICATED: 0, SharingPattern.PER_RANK: 100 + rank,
            SharingPattern.PER_NODE: 200 + node, SharingPattern.PER_GROUP: 300 + min(group)}[pattern]


def _mesh_groups(world: int):
    """Stage-replica groups of a DP x PP mesh (PP = 2 when world is even): ranks holding one stage."""
    import torch.distributed as dist

    pp = 2 if world % 2 == 0 and world > 2 else 1
    groups = [list(range(stage, world, pp)) for stage in range(pp)]
    mine = None
    for members in groups:  # new_group is collective: every rank creates every group, in order
        pg = dist.new_group(members, backend="gloo")
        if dist.get_rank() in members:
            mine = (pg, tuple(members))
    return mine


def roundtrip_all_patterns(rank: int, world: int, root: str, storage_options: dict | None = None) -> dict:
    """Every pattern saved and loaded under ``root`` (a local path or any URL)."""
    warnings.simplefilter("ignore")
    pg, group = _mesh_groups(world)
    node = rank // int(os.environ["LOCAL_WORLD_SIZE"])
    results = {}
    for pattern in SharingPattern:
        groups = {"stage_replicas": pg} if pattern is SharingPattern.PER_GROUP else {}
        group_name = "stage_replicas" if pattern is SharingPattern.PER_GROUP else None
        held = _value_id(pattern, rank, world, node, group)
        # GLOBAL: only rank 0's value is meaningful; others hold junk that must not be saved.
        source = Box(held if pattern is not SharingPattern.GLOBAL or rank == 0 else 999 + rank)
        out = join_url(root, pattern.value)
        saver = CheckpointCoordinator([StateComponent("box", source, pattern, process_group_name=group_name)],
                                      groups, out, storage_options, chunk_policy=SMALL_CHUNKS)
        path = saver.save_checkpoint(checkpoint_id="checkpoint-1")
        target = Box(None)
        loader = CheckpointCoordinator([StateComponent("box", target, pattern, process_group_name=group_name)],
                                       groups, out, storage_options, chunk_policy=SMALL_CHUNKS)
        loader.load_checkpoint()
        expected = Box(held)
        ok = (torch.equal(target.state["big"], expected.state["big"])
              and torch.equal(target.state["nested"]["w"], expected.state["nested"]["w"])
              and target.state["nested"]["tag"] == expected.state["nested"]["tag"]
              and target.state["step"] == expected.state["step"])
        manifest = read_manifest(path, storage_options)
        comp = manifest.components["box"]
        results[pattern.value] = {"ok": ok, "writers": comp.ranks, "copies": len(comp.copies),
                                  "size": comp.size_bytes}
    return results


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def outcome(ranks, request, tmp_path_factory):
    world = request.param
    root = str(tmp_path_factory.mktemp(f"patterns{world}"))
    per_node = 2 if world == 4 else 1  # world 4: 2 simulated nodes of 2 ranks; world 2: 2 nodes
    return world, ranks(roundtrip_all_patterns, world, root, ranks_per_node=per_node)


@pytest.mark.parametrize("pattern", list(SharingPattern), ids=lambda p: p.value)
def test_each_rank_loads_its_own_copy(outcome, pattern):
    world, results = outcome
    assert all(r[pattern.value]["ok"] for r in results), [r[pattern.value] for r in results]


@pytest.mark.parametrize("pattern", list(SharingPattern), ids=lambda p: p.value)
def test_one_copy_per_replica_set_written_by_its_holders(outcome, pattern):
    world, results = outcome
    info = results[0][pattern.value]
    nodes = max(1, world // 2) if world == 4 else world
    expected_copies = {SharingPattern.GLOBAL: 1, SharingPattern.REPLICATED: 1, SharingPattern.PER_RANK: world,
                       SharingPattern.PER_NODE: nodes,
                       SharingPattern.PER_GROUP: 2 if world == 4 else 1}[pattern]
    assert info["copies"] == expected_copies
    if pattern is SharingPattern.GLOBAL:
        assert info["writers"] == [0]
    else:  # the 64 KiB tensor is chunked, so every rank holding a copy takes part in writing it
        assert info["writers"] == list(range(world))


def hazard(rank: int, world: int, root: str) -> dict:
    """Ranks hold different values under one key (DCP_NOTES): plain DCP mixes them; PER_RANK does not."""
    import torch.distributed.checkpoint as dcp

    warnings.simplefilter("ignore")
    state = {"x": torch.full((4,), float(rank)), "tag": f"r{rank}"}
    dcp.save({"s": state}, checkpoint_id=os.path.join(root, "plain"))
    back = {"s": {"x": torch.zeros(4), "tag": ""}}
    dcp.load(back, checkpoint_id=os.path.join(root, "plain"))
    plain = (back["s"]["x"][0].item(), back["s"]["tag"])

    class S:
        def __init__(self, st):
            self.st = st

        def state_dict(self):
            return self.st

        def load_state_dict(self, st):
            self.st = st

    coord = CheckpointCoordinator([StateComponent("s", S(state), "per_rank")], output_dir=os.path.join(root, "forge"))
    coord.save_checkpoint(checkpoint_id="c")
    fresh = S({"x": torch.zeros(4), "tag": ""})
    CheckpointCoordinator([StateComponent("s", fresh, "per_rank")], output_dir=os.path.join(root, "forge")
                          ).load_checkpoint()
    return {"plain": plain, "forge": (fresh.st["x"][0].item(), fresh.st["tag"])}


def test_per_rank_values_under_one_key_come_back_to_their_own_rank(ranks, tmp_path):
    results = ranks(hazard, 2, str(tmp_path))
    assert [r["forge"] for r in results] == [(0.0, "r0"), (1.0, "r1")]
    # The hazard this guards against is real: plain DCP gives rank 1 a mixture of ranks' values.
    assert results[1]["plain"] != (1.0, "r1")
