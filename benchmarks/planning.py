"""Save planning at scale, simulated in one process: plans derived from the declarations on every
rank (dcp_forge) against plans gathered on the coordinator (DCP's default planner, with and without
``enable_plan_caching``, and dcp_forge's own fallback through the same gather).

The job, per rank (about ``items`` items): a REPLICATED model (data parallel; two embeddings big
enough to be cut into row-chunks), a PER_GROUP pipeline stage (4 stages; each stage's group is the
data-parallel replicas of that stage, and each stage holds different layers), GLOBAL DTensors under
FSDP2 as HSDP (sharded over the 8 ranks of a node, replicated across nodes; a few tensors too small
to give every rank a row: empty shards), a PER_RANK RNG state and a GLOBAL trainer state. Tensors
live on the ``meta`` device and DTensors on device meshes without process groups
(``_torch_compat.simulated_device_mesh``): planning never touches data or the network.

What is measured, per phase (median over repetitions):

- *local compute*: what one rank runs before it may write (set-up, local plan, and for dcp_forge the
  replica sets, their digests and the derived placement; for DCP's path ``finish_plan`` of the plan
  it gets back), on the coordinator (rank 0) and on a representative other rank; the slowest counts;
- *coordinator before writes*: DCP's global plan over every rank's local plan (the gather's input);
  dcp_forge has none;
- *critical path*: local compute + coordinator before writes, what every rank waits for before
  writing (the network transfers are counted in bytes, not seconds);
- *coordinator at commit*: what dcp_forge's coordinator computes from the ranks' reports once they
  wrote (``global_plan_and_metadata``: proving every set written once and building DCP's metadata);
  off the planning path, on the commit's;
- *bytes per rank / at the coordinator / in total*: the payloads that would cross the network for
  planning and commit, from the pickled sizes and torch's collective implementations: DCP's
  ``gather_object`` all-gathers every rank's size (8 bytes x ranks to each rank) and pads every
  payload to the largest, ``scatter_object_list`` pads to the largest plan, and DCP broadcasts the
  whole metadata to every rank after the commit; dcp_forge sums a fixed number of int64 lanes, gathers
  one padded report per rank (its write results, and on a first save its final plan) and broadcasts the
  outcome. Write results (locations, checksums) must reach the coordinator on both paths.

The coordinator's work needs every rank's plan. Ranks fall into classes (pipeline stage x shard
index) whose plans differ only in their PER_RANK keys, so one rank per class is planned for real
and the others' plans are that rank's with their own PER_RANK items (and, for dcp_forge, the items
the shared placement gave them); at 8 and 64 ranks every rank is also planned for real, and the
benchmark checks that the ranks' agreement sums vanish and that the class-built plans and metadata
equal the real ones. The all-reduce's result on a representative rank is what agreeing ranks sum to.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gc
import math
import pickle
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.planner import SavePlanner as DcpSavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor, Replicate, Shard

from benchmarks.results import write_json
from dcp_forge._torch_compat import local_shard_shape, simulated_device_mesh
from dcp_forge.core.agreement import PRIMES, all_agree
from dcp_forge.core.keys import storage_key
from dcp_forge.core.patterns import SharingPattern
from dcp_forge.core.placement import item_bytes
from dcp_forge.core.topology import Topology
from dcp_forge.format.index import StoredItem
from dcp_forge.planners import ForgeSavePlanner, PlanCache
from dcp_forge.planners.derived import (
    CommitReport,
    PlanSummary,
    item_key,
    items_digest,
    set_name,
    verified_global_plan,
)
from dcp_forge.planners.save import COORDINATOR_LANES, COUNT_LANES
from dcp_forge.rank_exchange import RankExchange

STAGES = 4
SHARD_GROUP = 8  # HSDP: sharded within a node of 8 ranks, replicated across nodes
DECLARED: dict[str, SharingPattern | tuple[SharingPattern, str]] = {"model": SharingPattern.REPLICATED, "stage": (SharingPattern.PER_GROUP, "pp"),
            "fsdp": SharingPattern.GLOBAL, "rng": SharingPattern.PER_RANK, "trainer": SharingPattern.GLOBAL}
WORLDS = (8, 64, 256, 1024, 4096)
LANE_BYTES = 8


# --- the job -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    world: int
    items: int = 1000

    @property
    def shards(self) -> int:
        return min(SHARD_GROUP, self.world)

    def topology(self, rank: int) -> Topology:
        """One object per rank, as a coordinator keeps it from save to save."""
        return _topology(self.world, self.shards, rank)

    def rank_class(self, rank: int) -> tuple[int, int]:
        """Ranks of one class hold the same items but for their PER_RANK keys (rank 0 also the GLOBAL values)."""
        return (rank % min(STAGES, self.world), rank % self.shards)

    def state(self, rank: int) -> dict[str, Any]:
        """About ``items`` items: a fifth replicated, a fifth of this rank's stage, 10 RNG and trainer
        values, the rest DTensors."""
        replicated = stage = self.items // 5
        dtensors = max(1, self.items - replicated - stage - 10 - 6)  # 6: the embeddings' extra row-chunks
        stage_index = rank % min(STAGES, self.world)
        mesh = simulated_device_mesh((self.world // self.shards, self.shards), rank)
        placements = (Replicate(), Shard(0))
        model = {f"embed.{i}": torch.empty(4096, 4096, device="meta") for i in range(2)}
        model.update({f"layers.{i}.norm": torch.empty(256 + i % 7, device="meta") for i in range(replicated - 2)})
        layers = {f"layers.{stage_index * stage + i}.weight": torch.empty(512 + i % 5, 256, device="meta")
                  for i in range(stage)}
        fsdp = {}
        for i in range(dtensors):
            shape = (5,) if i % 50 == 0 else (1024 * (1 + i % 4), 512 + i % 3)  # a few too small for 8 shards
            local = local_shard_shape(shape, mesh, placements)
            stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
            fsdp[f"params.{i}"] = DTensor.from_local(torch.empty(local, device="meta"), mesh, placements,
                                                     run_check=False, shape=torch.Size(shape), stride=stride)
        rng = {"torch": torch.empty(5056, dtype=torch.uint8, device="meta"),
               "cuda": torch.empty(16, dtype=torch.uint8, device="meta"), "seed": 1234 + rank,
               "python": (3, tuple(range(8)), None)}
        trainer = {"step": 1000, "epoch": 3, "tokens": 2**40, "lr": 3e-4, "best": 1.5, "run": "scale"}
        return {"model": model, "stage": layers, "fsdp": fsdp, "rng": rng, "trainer": trainer}

    def storage_state(self, rank: int) -> dict[str, Any]:
        """The same state under dcp_forge's storage keys: what a user of DCP's planner would save."""
        topology = self.topology(rank)
        out = {}
        for key, value in self.state(rank).items():
            pattern = DECLARED[key]
            pattern, group = pattern if isinstance(pattern, tuple) else (pattern, None)
            out[storage_key(key, pattern, topology, group)] = value
        return out


@functools.cache
def _topology(world: int, ranks_per_node: int, rank: int) -> Topology:
    stages = min(STAGES, world)
    return Topology.uniform(rank, world, ranks_per_node=ranks_per_node,
                            groups={"pp": [range(s, world, stages) for s in range(stages)]})


class AgreedExchange(RankExchange):
    """A rank's view of the planning all-reduce in a job whose ranks agree, as they do here by
    construction: every rank adds the same counts, the coordinator its own lanes (``coordinator``,
    which its own planning fills in), and agreement sums vanish (checked at 8 and 64 ranks by summing
    every rank's terms)."""

    def __init__(self, rank: int, world_size: int, coordinator: list[int]) -> None:
        super().__init__(None)
        self.rank, self.world_size, self.coordinator = rank, world_size, coordinator

    def sum(self, values: Sequence[int]) -> list[int]:
        own = slice(COUNT_LANES, COUNT_LANES + COORDINATOR_LANES)
        if self.rank == 0:
            self.coordinator[:] = values[own]
        if len(self.coordinator) != COORDINATOR_LANES:
            raise RuntimeError("simulate the coordinator (rank 0) before the other ranks")
        return ([v * self.world_size for v in values[:COUNT_LANES]] + list(self.coordinator)
                + [0] * (len(values) - COUNT_LANES - COORDINATOR_LANES))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its seconds, with the garbage collector paused (as ``timeit`` does): a collection of
    the many plans this process holds for every simulated rank would land on whichever phase runs.
    No collection first: with the collector off, garbage left by earlier phases costs the timed one
    nothing, and a full collection over those plans takes longer than most phases."""
    gc.disable()
    try:
        started = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - started
    finally:
        gc.enable()


def _size(obj: Any) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _results(plan: SavePlan, rank: int) -> list[WriteResult]:
    """The write results a rank would send for ``plan``: where each item went and its checksum."""
    out: list[WriteResult] = []
    offset = 0
    for item in plan.items:
        length = item_bytes(item) + 700
        out.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=StoredItem(
            f"__{rank}_{len(out) % 2}.distcp", offset, length, "0f1e2d3c4b5a6978", rank,
            512 if length >= 256 * 1024 else None)))
        offset += length
    return out


# --- dcp_forge: derived on every rank ------------------------------------------------------------

@dataclasses.dataclass
class RankPlanning:
    planner: ForgeSavePlanner
    seconds: float
    report_bytes: int
    local_items: int


_coordinator_lanes: dict[Job, list[int]] = collections.defaultdict(list)  # what rank 0 adds, per job


def plan_by_declarations(job: Job, rank: int, cache: PlanCache, state: dict | None = None) -> RankPlanning:
    """One rank's whole planning by itself (first save with an empty cache, else a repeated save)."""
    state = job.state(rank) if state is None else state
    planner = ForgeSavePlanner(DECLARED, job.topology(rank), planning_only=True,
                               exchange=AgreedExchange(rank, job.world, _coordinator_lanes[job]), plan_cache=cache)

    def plan() -> int:
        planner.set_up_planner(state, is_coordinator=rank == 0)
        local = planner.create_local_plan()
        _summary(planner)  # this rank can plan by itself
        finals, _ = planner.create_global_plan([local])
        planner.finish_plan(finals[0])
        return len(local.items)

    local_items, seconds = _timed(plan)
    report = planner.commit_report()
    report_bytes = _size((None, _results(planner.plan, rank), report))
    return RankPlanning(planner, seconds, report_bytes, local_items)


def _summary(planner: ForgeSavePlanner) -> PlanSummary:
    """Who holds each item of the planner's last local plan; raises unless its rank planned by itself."""
    summary = planner.summary
    if not isinstance(summary, PlanSummary):
        raise RuntimeError(f"rank {planner.topology.rank} cannot plan by itself: {summary}")
    return summary


def _renamed(item_or_key: Any, old: int, new: int) -> Any:
    """A rank's PER_RANK item (or key) as another rank of its class holds it."""
    before, after = f"rng@rank{old}", f"rng@rank{new}"
    if isinstance(item_or_key, str):
        return after + item_or_key[len(before):]
    index = MetadataIndex(_renamed(item_or_key.index.fqn, old, new), item_or_key.index.offset)
    return dataclasses.replace(item_or_key, index=index)


def class_reports(job: Job, representatives: dict[tuple[int, int], ForgeSavePlanner]) -> list[CommitReport]:
    """Every rank's commit report, built from its class's representative (see the module docstring)."""
    writers = {cls: _summary(planner).writers(planner.placement_base) for cls, planner in representatives.items()}
    reports = []
    for rank in range(job.world):
        cls = job.rank_class(rank)
        rep = representatives[cls]
        rep_rank, summary = rep.topology.rank, _summary(rep)
        items, item_sets, sets = [], [], []
        for share in summary.sets:
            if share.size > 1:
                sets.append((share.name, share.size, share.members.index(rank), share.digest))
                mine = [it for it in share.items if writers[cls][item_key(it)] == rank]
                items += mine
                item_sets += [len(sets) - 1] * len(mine)
        own = [it for share in summary.sets if share.size == 1 for it in share.items]
        paths = dict(rep.mappings)
        if rank != rep_rank:  # its own PER_RANK items; the GLOBAL values are rank 0's
            own = [_renamed(it, rep_rank, rank) for it in own if it.index.fqn.startswith(f"rng@rank{rep_rank}")]
            paths = {(_renamed(k, rep_rank, rank) if k.startswith(f"rng@rank{rep_rank}") else k):
                     ((_renamed(p[0], rep_rank, rank), *p[1:]) if k.startswith(f"rng@rank{rep_rank}") else p)
                     for k, p in paths.items()}
        sets.append((set_name((rank,)), 1, 0, items_digest(own)))
        items += own
        item_sets += [len(sets) - 1] * len(own)
        written = {it.index.fqn for it in items}
        reports.append(CommitReport(SavePlan(items, planner_data={k: p for k, p in paths.items() if k in written}),
                                    tuple(sets), tuple(item_sets)))
    return reports


# --- gathered on the coordinator (DCP, and dcp_forge's fallback) ----------------------------------

def dcp_local_plan(job: Job, rank: int, state: dict | None = None, caching: bool = False
                   ) -> tuple[DefaultSavePlanner, SavePlan, float]:
    planner = DefaultSavePlanner(enable_plan_caching=caching)
    state = job.storage_state(rank) if state is None else state

    def plan() -> SavePlan:
        planner.set_up_planner(state, is_coordinator=rank == 0)
        return planner.create_local_plan()

    local, seconds = _timed(plan)
    return planner, local, seconds


def class_local_plans(job: Job, representatives: dict[tuple[int, int], SavePlan], rep_ranks: dict,
                      global_on_rank0_only: bool) -> list[SavePlan]:
    """Every rank's local plan from its class's representative (PER_RANK items renamed; with
    ``global_on_rank0_only``, as dcp_forge plans them, the GLOBAL trainer values on rank 0 only)."""
    plans = []
    for rank in range(job.world):
        cls = job.rank_class(rank)
        rep, rep_rank = representatives[cls], rep_ranks[cls]
        if rank == rep_rank:
            plans.append(rep)
            continue
        own = f"rng@rank{rep_rank}"
        items = [_renamed(it, rep_rank, rank) if it.index.fqn.startswith(own) else it for it in rep.items
                 if not (global_on_rank0_only and it.index.fqn.startswith("trainer"))]
        data = {(_renamed(k, rep_rank, rank) if k.startswith(own) else k):
                ((_renamed(v[0], rep_rank, rank), *v[1:]) if k.startswith(own) else v)
                for k, v in (rep.planner_data or {}).items()}
        plans.append(dataclasses.replace(rep, items=items, planner_data=data))
    return plans


def _gather_bytes(world: int, payloads: Sequence[int]) -> tuple[int, int]:
    """DCP's ``gather_object``: (bytes per rank, bytes at the coordinator)."""
    padded = max(payloads)
    return 2 * 8 * (world - 1) + padded, world * padded


# --- the measurement -----------------------------------------------------------------------------

def _representative_ranks(world: int) -> list[int]:
    """The coordinator and a rank of another node, stage and shard index."""
    return [0] if world == 1 else [0, world - 3 if world > 3 else world - 1]


def forge_saves(job: Job, repetitions: int, states: dict[int, dict] | None = None
                ) -> tuple[dict[str, Any], list[CommitReport], Any]:
    """dcp_forge's first save on the representative ranks, every rank's report (one real rank per
    class), the coordinator's commit work, then the repeated save; medians over ``repetitions``."""
    world = job.world
    reps = _representative_ranks(world)
    states = states or {r: job.state(r) for r in reps}
    classes = sorted({job.rank_class(r) for r in range(world)})
    rep_of = {cls: next(r for r in range(world) if job.rank_class(r) == cls) for cls in classes}
    first: list[float] = []
    again: list[float] = []
    commit: list[float] = []
    reports: list[CommitReport] | None = None
    for _ in range(repetitions):
        caches = {r: PlanCache() for r in reps}
        runs = {r: plan_by_declarations(job, r, caches[r], states[r]) for r in reps}
        first.append(max(run.seconds for run in runs.values()))
        if reports is None:
            reports = class_reports(job, {cls: runs[r].planner if r in runs else
                                          plan_by_declarations(job, r, PlanCache()).planner
                                          for cls, r in rep_of.items()})
        coordinator = runs[0].planner
        (_, metadata), seconds = _timed(lambda: coordinator.global_plan_and_metadata(reports, "bench"))  # noqa: B023
        commit.append(seconds)
        for run in runs.values():
            run.planner.committed("generation-1")
        repeat = {r: plan_by_declarations(job, r, caches[r], states[r]) for r in reps}
        if any(run.planner.planned_by != "cache" for run in repeat.values()):
            raise AssertionError("the repeated save did not reuse the plans")
        again.append(max(run.seconds for run in repeat.values()))
    if reports is None:
        raise ValueError(f"forge_saves needs at least one repetition, not {repetitions}")
    outcome = _size(("ok", "dcp-forge-0123456789abcdef0123456789abcdef"))
    lanes = LANE_BYTES * (COUNT_LANES + COORDINATOR_LANES + 2 * len(PRIMES))
    # The gather pads every rank's report to the largest: the rank writing the most sets the size.
    results = [_results(report.plan, rank) for rank, report in enumerate(reports)]
    report_bytes = max(_size((None, res, report)) for res, report in zip(results, reports, strict=True))
    again_bytes = max(_size((None, res, None)) for res in results)
    row = {"items_per_rank": max(run.local_items for run in runs.values()),
           "forge_local": statistics.median(first), "forge_again_local": statistics.median(again),
           "forge_commit": statistics.median(commit),
           "forge_bytes_per_rank": lanes + 8 + report_bytes + outcome,
           "forge_again_bytes_per_rank": lanes + 8 + again_bytes + outcome,
           "forge_bytes_coordinator": world * report_bytes}
    row["forge_bytes_total"] = world * row["forge_bytes_per_rank"]
    return row, reports, metadata


def measure(job: Job, repetitions: int, local_repetitions: int, validate: bool, gathered: bool,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    world = job.world
    reps = _representative_ranks(world)
    states = {r: job.state(r) for r in reps}
    row: dict[str, Any] = {"world": world, "items_target": job.items}

    forge, reports, metadata = forge_saves(job, local_repetitions, states)
    row.update(forge)
    row["unique_items"] = sum(len(r.plan.items) for r in reports)
    row["metadata_bytes"] = _size(metadata)
    classes = sorted({job.rank_class(r) for r in range(world)})
    rep_of = {cls: next(r for r in range(world) if job.rank_class(r) == cls) for cls in classes}

    if validate:
        _validate(job, reports, metadata, log)
        row["validated"] = True

    # DCP's default planner: local plans of every rank (by class), its global plan, finish.
    dcp_reps = {cls: dcp_local_plan(job, r)[1] for cls, r in rep_of.items()}
    dcp_states = {r: job.storage_state(r) for r in reps}
    row["dcp_local"] = statistics.median(max(dcp_local_plan(job, r, dcp_states[r])[2] for r in reps)
                                         for _ in range(local_repetitions))
    local_plans = class_local_plans(job, dcp_reps, rep_of, global_on_rank0_only=False)
    glob = []
    for _ in range(repetitions if gathered else 1):
        (finals, dcp_metadata), seconds = _timed(lambda: DefaultSavePlanner().create_global_plan(local_plans))
        glob.append(seconds)
    row["dcp_global"] = statistics.median(glob)
    sampled = sorted({*reps, *rep_of.values()})
    local_bytes = [_size(local_plans[r]) for r in sampled]
    final_bytes = max(_size(finals[r]) for r in sampled)
    results_bytes = max(_size(_results(finals[r], r)) for r in sampled)
    plan_up, plan_up_coord = _gather_bytes(world, local_bytes)
    results_up, results_coord = _gather_bytes(world, [results_bytes])
    row["dcp_metadata_bytes"] = _size(dcp_metadata)
    row["dcp_bytes_per_rank"] = plan_up + 8 + final_bytes + results_up + row["dcp_metadata_bytes"]
    row["dcp_bytes_coordinator"] = (plan_up_coord + world * final_bytes + results_coord
                                    + world * row["dcp_metadata_bytes"])
    row["dcp_bytes_total"] = world * row["dcp_bytes_per_rank"]

    # DCP with enable_plan_caching, repeated save: every rank re-plans and compares, sends an empty plan.
    cached_local = []
    for _ in range(local_repetitions):
        slowest = 0.0
        for r in reps:
            planner, plan, _ = dcp_local_plan(job, r, dcp_states[r], caching=True)
            DcpSavePlanner._cached_save_plan[planner._cached_plans_key] = plan  # this rank's previous plan
            _, again_plan, seconds = dcp_local_plan(job, r, dcp_states[r], caching=True)
            if again_plan.usable:
                raise AssertionError("DCP's plan cache did not recognise the unchanged plan")
            slowest = max(slowest, seconds)
        cached_local.append(slowest)
    DcpSavePlanner._cached_save_plan.clear()
    row["dcp_cached_local"] = statistics.median(cached_local)
    empty = SavePlan([], usable=False)
    key = DefaultSavePlanner()._cached_plans_key
    DcpSavePlanner._cached_all_plans[key], DcpSavePlanner._cached_global_plan[key] = local_plans, finals
    DcpSavePlanner._cached_metadata[key] = dcp_metadata
    _, row["dcp_cached_global"] = _timed(
        lambda: DefaultSavePlanner(enable_plan_caching=True).create_global_plan([empty] * world))
    for cache in (DcpSavePlanner._cached_all_plans, DcpSavePlanner._cached_global_plan,
                  DcpSavePlanner._cached_metadata):
        cache.clear()
    empty_up, _ = _gather_bytes(world, [_size(empty)])
    row["dcp_cached_bytes_per_rank"] = empty_up + 8 + _size(empty) + results_up + row["dcp_metadata_bytes"]
    row["dcp_cached_bytes_total"] = world * row["dcp_cached_bytes_per_rank"]

    if gathered:  # dcp_forge's fallback: its own local plans through the same gather
        forge_reps = {}
        for cls, r in rep_of.items():
            planner = ForgeSavePlanner(DECLARED, job.topology(r), planning_only=True)
            planner.set_up_planner(job.state(r), is_coordinator=r == 0)
            forge_reps[cls] = planner.create_local_plan()
        forge_plans = class_local_plans(job, forge_reps, rep_of, global_on_rank0_only=True)
        _, row["fallback_global"] = _timed(lambda: ForgeSavePlanner(DECLARED, job.topology(0), planning_only=True)
                                           .create_global_plan(forge_plans))
    row["forge_critical_path"] = row["forge_local"]
    row["forge_again_critical_path"] = row["forge_again_local"]
    row["dcp_critical_path"] = row["dcp_local"] + row["dcp_global"]
    row["dcp_cached_critical_path"] = row["dcp_cached_local"] + row["dcp_cached_global"]
    log(f"planning {world:>5} ranks x {row['items_per_rank']} items: dcp_forge {row['forge_critical_path']:.3f} s "
        f"(again {row['forge_again_critical_path'] * 1000:.1f} ms, commit {row['forge_commit']:.3f} s); "
        f"DCP {row['dcp_critical_path']:.3f} s (global {row['dcp_global']:.3f} s; cached again "
        f"{row['dcp_cached_critical_path']:.3f} s)")
    return row


def _validate(job: Job, reports: list[CommitReport], metadata: Any, log: Callable[[str], None]) -> None:
    """Plan every rank for real: the agreement sums vanish, and the class-built reports are the real ones."""
    summed = [0] * len(PRIMES)
    real = []
    for rank in range(job.world):
        run = plan_by_declarations(job, rank, PlanCache())
        summed = [(a + b) % p for a, b, p in zip(summed, _summary(run.planner).agreement_terms(), PRIMES, strict=True)]
        report = run.planner.commit_report()
        if report is None:
            raise AssertionError(f"rank {rank} planned by itself but has no commit report")
        real.append(report)
    if not all_agree(summed):
        raise AssertionError(f"the ranks of the {job.world}-rank job do not agree")
    for rank, (ours, theirs) in enumerate(zip(reports, real, strict=True)):
        if sorted(map(str, (i.index for i in ours.plan.items))) != sorted(map(str, (i.index for i in theirs.plan.items))):
            raise AssertionError(f"rank {rank}: the class-built plan differs from the real one")
    _, real_metadata = verified_global_plan(real, job.world, "bench")
    if real_metadata.state_dict_metadata.keys() != metadata.state_dict_metadata.keys():
        raise AssertionError("the class-built metadata differs from the real one")
    log(f"validated {job.world} ranks: agreement sums vanish, class-built plans equal the real ones")


def items_sweep(world: int, sizes: Sequence[int], repetitions: int) -> list[dict[str, Any]]:
    """dcp_forge's critical path (first and repeated save) and commit against items per rank."""
    rows = []
    for items in sizes:
        forge, _, _ = forge_saves(Job(world, items), repetitions)
        rows.append({"world": world, "items": forge["items_per_rank"], "first": forge["forge_local"],
                     "again": forge["forge_again_local"], "commit": forge["forge_commit"]})
    return rows


def run_planning(worlds: Sequence[int] = WORLDS, items: int = 1000, repetitions: int = 3,
                 local_repetitions: int = 7, validate_up_to: int = 64,
                 sweep: Sequence[int] = (250, 500, 1000, 2000), log: Callable[[str], None] = print) -> dict[str, Any]:
    """``repetitions`` of the coordinator's global plans over every rank (once at 4,096 ranks, where
    DCP's takes tens of seconds), ``local_repetitions`` of everything one rank runs."""
    rows = []
    for world in worlds:
        rows.append(measure(Job(world, items), repetitions, local_repetitions, validate=world <= validate_up_to,
                            gathered=world <= 1024, log=log))
    sweep_rows = items_sweep(max(worlds), sweep, local_repetitions) if sweep else []
    return {"items": items, "repetitions": repetitions, "local_repetitions": local_repetitions, "rows": rows,
            "sweep": sweep_rows}


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_planning(result: dict[str, Any]) -> str:
    lines = ["First save (no plan cached):", "",
             "| ranks | items/rank | dcp_forge local = critical path | dcp_forge coordinator at commit | "
             "DCP local | DCP coordinator global plan | DCP critical path | DCP / dcp_forge | "
             "bytes/rank dcp_forge vs DCP | total dcp_forge vs DCP | dcp_forge fallback global plan |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        fallback = f"{r['fallback_global']:.3f} s" if "fallback_global" in r else "not run"
        lines.append(
            f"| {r['world']:,} | {r['items_per_rank']:,} | **{r['forge_critical_path']:.3f} s** | {r['forge_commit']:.3f} s | "
            f"{r['dcp_local']:.3f} s | {r['dcp_global']:.3f} s | {r['dcp_critical_path']:.3f} s | "
            f"{r['dcp_critical_path'] / r['forge_critical_path']:.1f}x | {_bytes(r['forge_bytes_per_rank'])} vs "
            f"{_bytes(r['dcp_bytes_per_rank'])} | {_bytes(r['forge_bytes_total'])} vs {_bytes(r['dcp_bytes_total'])} | "
            f"{fallback} |")
    lines += ["", "Repeated save (same structure):", "",
              "| ranks | dcp_forge critical path | DCP + enable_plan_caching: local | coordinator | critical path | "
              "DCP cached / dcp_forge | bytes/rank dcp_forge vs DCP cached | total dcp_forge vs DCP cached |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(
            f"| {r['world']:,} | **{r['forge_again_critical_path'] * 1000:.1f} ms** | {r['dcp_cached_local']:.3f} s | "
            f"{r['dcp_cached_global'] * 1000:.1f} ms | {r['dcp_cached_critical_path']:.3f} s | "
            f"{r['dcp_cached_critical_path'] / r['forge_again_critical_path']:.1f}x | "
            f"{_bytes(r['forge_again_bytes_per_rank'])} vs {_bytes(r['dcp_cached_bytes_per_rank'])} | "
            f"{_bytes(r['world'] * r['forge_again_bytes_per_rank'])} vs {_bytes(r['dcp_cached_bytes_total'])} |")
    if result.get("sweep"):
        world = result["sweep"][0]["world"]
        lines += ["", f"dcp_forge at {world:,} ranks against items per rank:", "",
                  "| items/rank | first save critical path | per 1,000 items | repeated save | coordinator at commit |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for s in result["sweep"]:
            lines.append(f"| {s['items']:,} | {s['first']:.3f} s | {s['first'] / s['items'] * 1000:.3f} s | "
                         f"{s['again'] * 1000:.1f} ms | {s['commit']:.3f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save planning at scale, simulated in one process: dcp_forge's "
                                     "plans derived from the declarations vs DCP's gathered plans.")
    parser.add_argument("--worlds", type=int, nargs="+", default=list(WORLDS), help="simulated ranks")
    parser.add_argument("--items", type=int, default=1000, help="items per rank (about)")
    parser.add_argument("--repetitions", type=int, default=3,
                        help="repetitions of the coordinator's global plans over every rank; medians are reported")
    parser.add_argument("--local-repetitions", type=int, default=7,
                        help="repetitions of what one rank computes; medians are reported")
    parser.add_argument("--validate-up-to", type=int, default=64,
                        help="plan every rank for real up to this world size, to check the simulation")
    parser.add_argument("--sweep", type=int, nargs="*", default=[250, 500, 1000, 2000],
                        help="items per rank for dcp_forge at the largest world (none: skip)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    result = run_planning(args.worlds, args.items, args.repetitions, args.local_repetitions, args.validate_up_to,
                          args.sweep)
    print(format_planning(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
