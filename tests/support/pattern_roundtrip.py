"""Every sharing pattern saved and loaded back on one rank of a real job (run it on every rank)."""

from __future__ import annotations

import os
import warnings

import torch

from dcp_forge import CheckpointCoordinator, SharingPattern, StateComponent, read_manifest
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.storage import join_url

SMALL_CHUNKS = ChunkPolicy(min_chunk_bytes=4096, chunks_per_holder=2)


class SeededState:
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
        source = SeededState(held if pattern is not SharingPattern.GLOBAL or rank == 0 else 999 + rank)
        out = join_url(root, pattern.value)
        saver = CheckpointCoordinator([StateComponent("box", source, pattern, process_group_name=group_name)],
                                      groups, out, storage_options, chunk_policy=SMALL_CHUNKS)
        path = saver.save_checkpoint(checkpoint_id="checkpoint-1")
        target = SeededState(None)
        loader = CheckpointCoordinator([StateComponent("box", target, pattern, process_group_name=group_name)],
                                       groups, out, storage_options, chunk_policy=SMALL_CHUNKS)
        loader.load_checkpoint()
        expected = SeededState(held)
        ok = (torch.equal(target.state["big"], expected.state["big"])
              and torch.equal(target.state["nested"]["w"], expected.state["nested"]["w"])
              and target.state["nested"]["tag"] == expected.state["nested"]["tag"]
              and target.state["step"] == expected.state["step"])
        manifest = read_manifest(path, storage_options)
        comp = manifest.components["box"]
        results[pattern.value] = {"ok": ok, "writers": comp.ranks, "copies": len(comp.copies),
                                  "size": comp.size_bytes}
    return results
