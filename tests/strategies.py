"""Hypothesis strategies shared by every property test: topologies, declarations, state dicts,
and a one-process simulation of DCP's save planning across all ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from dcp_forge.placement import ChunkPolicy
from dcp_forge.planners import ForgeSavePlanner
from dcp_forge.sharing import ComponentLayout, SharingPattern
from dcp_forge.topology import Topology

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]


@st.composite
def topologies(draw, max_world: int = 8) -> Topology:
    """World 1..max_world, equal nodes, and up to two named group families partitioning the world."""
    world = draw(st.integers(1, max_world))
    per_node = draw(st.sampled_from([d for d in range(1, world + 1) if world % d == 0]))
    groups = {}
    for name in draw(st.lists(st.sampled_from(["dp", "pp", "tp"]), unique=True, max_size=2)):
        size = draw(st.sampled_from([d for d in range(1, world + 1) if world % d == 0]))
        if draw(st.booleans()):  # contiguous blocks, like a DP group in a DPxPP mesh row
            parts = [tuple(range(s, s + size)) for s in range(0, world, size)]
        else:  # strided, like the ranks holding one pipeline stage
            stride = world // size
            parts = [tuple(range(s, world, stride)) for s in range(stride)]
        groups[name] = tuple(parts)
    return Topology(rank=0, world_size=world, node_of_rank=tuple(r // per_node for r in range(world)),
                    groups=groups)


@st.composite
def layouts(draw, topology: Topology) -> dict[str, ComponentLayout]:
    count = draw(st.integers(1, 5))
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), min_size=count,
                          max_size=count, unique=True))
    patterns = list(SharingPattern)
    if not topology.groups:
        patterns.remove(SharingPattern.PER_GROUP)
    out = {}
    for name in names:
        pattern = draw(st.sampled_from(patterns))
        group = draw(st.sampled_from(sorted(topology.groups))) if pattern is SharingPattern.PER_GROUP else None
        out[name] = ComponentLayout(name, pattern, group)
    return out


@st.composite
def shapes(draw) -> tuple[int, ...]:
    ndim = draw(st.integers(0, 3))
    return tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))


@st.composite
def component_state(draw) -> dict:
    """A nested state dict of meta tensors (no memory) and plain values."""
    entries = {}
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "value", "nested"]))
        if kind == "tensor":
            entries[f"t{i}"] = torch.empty(draw(shapes()), dtype=draw(st.sampled_from(DTYPES)), device="meta")
        elif kind == "value":
            entries[f"v{i}"] = draw(st.one_of(st.integers(), st.text(max_size=5), st.booleans()))
        else:
            entries[f"n{i}"] = {"w": torch.empty(draw(shapes()), device="meta"), "step": draw(st.integers(0, 9))}
    return entries


@dataclass
class Job:
    topology: Topology
    layouts: dict[str, ComponentLayout]
    states: dict[str, dict]  # component -> state (the same object on every rank: shapes agree)
    policy: ChunkPolicy


@st.composite
def jobs(draw, max_world: int = 8) -> Job:
    topology = draw(topologies(max_world))
    lay = draw(layouts(topology))
    states = {name: draw(component_state()) for name in lay}
    # Tiny chunks, so that small test tensors get split the way gigabyte ones would.
    policy = ChunkPolicy(min_chunk_bytes=draw(st.sampled_from([64, 256, 1024, 1 << 20])),
                         chunks_per_holder=draw(st.integers(1, 4)))
    return Job(topology, lay, states, policy)


def local_plans(job: Job) -> tuple[list, list[ForgeSavePlanner]]:
    """Every rank's local save plan, as DCP would compute them (in one process)."""
    plans, planners = [], []
    for rank in range(job.topology.world_size):
        declared = {k: (v.pattern, v.group_name) if v.group_name else v.pattern for k, v in job.layouts.items()}
        planner = ForgeSavePlanner(declared, job.topology.with_rank(rank), chunk_policy=job.policy)
        planner.set_up_planner(dict(job.states), is_coordinator=rank == 0)
        plans.append(planner.create_local_plan())
        planners.append(planner)
    return plans, planners
