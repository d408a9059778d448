"""Hypothesis strategies shared by every property test: topologies, declarations, state dicts,
a one-process simulation of DCP's save planning across all ranks, and N -> M resharding cases
(real DTensors on process-group-less device meshes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.tensor import DTensor, Replicate, Shard

from dcp_forge._torch_compat import local_shard_shape, simulated_device_mesh
from dcp_forge.core.agreement import LANES, PRIMES
from dcp_forge.core.components import ComponentLayout, StateComponent
from dcp_forge.core.patterns import SharingPattern
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.core.topology import Topology
from dcp_forge.planners import ForgeLoadPlanner, ForgeSavePlanner
from dcp_forge.planners.derived import PlanSummary

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
    return save_plans([dict(job.states)] * job.topology.world_size, job.layouts, job.topology, job.policy)


def save_plans(states: list[dict], layouts: dict[str, ComponentLayout], topology: Topology,
               policy: ChunkPolicy) -> tuple[list, list[ForgeSavePlanner]]:
    """Every rank's local save plan for ``states[rank]`` (in one process)."""
    declared = {k: (v.pattern, v.group_name) if v.group_name else v.pattern for k, v in layouts.items()}
    plans, planners = [], []
    for rank in range(topology.world_size):
        planner = ForgeSavePlanner(declared, topology.with_rank(rank), chunk_policy=policy, planning_only=True)
        planner.set_up_planner(states[rank], is_coordinator=rank == 0)
        plans.append(planner.create_local_plan())
        planners.append(planner)
    return plans, planners


@dataclass
class DerivedJob:
    """Every rank's planning of one save by itself, simulated in one process (planners/derived.py)."""

    local: list  # every rank's local plan
    summaries: list[PlanSummary | str]
    summed: list[int]  # the agreement lanes, summed over the ranks as the all-reduce would
    finals: list  # every rank's own final plan (only meaningful where the ranks agree)
    coordinator_bytes: int  # rank 0's GLOBAL values, which the placement balances against


def derived_plans(states: list[dict], layouts: dict[str, ComponentLayout], topology: Topology,
                  policy: ChunkPolicy) -> DerivedJob:
    """What each rank of ``topology`` plans by itself for ``states[rank]``."""
    plans, planners = save_plans(states, layouts, topology, policy)
    summaries = [planner.summarize_holders(plan) for planner, plan in zip(planners, plans, strict=True)]
    summed = [0] * LANES
    for summary in summaries:
        if isinstance(summary, PlanSummary):
            summed = [(a + b) % p for a, b, p in zip(summed, summary.agreement_terms(), PRIMES, strict=True)]
    coordinator_bytes = planners[0].global_value_bytes()  # what the all-reduce shares besides
    base = {0: coordinator_bytes} if coordinator_bytes else {}
    finals = [summary.final_plan(plan, base) if isinstance(summary, PlanSummary) else None
              for summary, plan in zip(summaries, plans, strict=True)]
    return DerivedJob(plans, summaries, summed, finals, coordinator_bytes)


def commit_reports(job: DerivedJob) -> list:
    """What every rank of ``job`` would report to the coordinator after writing its final plan."""
    return [summary.commit_report(final) for summary, final in zip(job.summaries, job.finals, strict=True)]


# --- N -> M resharding ------------------------------------------------------------------------

def dtensor_on_rank(shape: tuple[int, ...], dtype: torch.dtype, mesh_shape: tuple[int, ...], rank: int,
                    placements: tuple) -> DTensor:
    """The real DTensor rank ``rank`` of a ``mesh_shape`` mesh holds under ``placements``, built in
    one process: the DeviceMesh has no process group behind it, which planning never needs. Uneven and empty shards, Replicate and nested Shard come
    out exactly as on a real job, through DTensor's own checkpoint protocol."""
    mesh = simulated_device_mesh(mesh_shape, rank)
    sizes = local_shard_shape(shape, mesh, placements)
    stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
    return DTensor.from_local(torch.zeros(sizes, dtype=dtype), mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


@dataclass(frozen=True)
class Sharding:
    """A mesh of ``world`` ranks (1-D or 2-D, row-major like ``init_device_mesh``) and placements."""

    mesh_shape: tuple[int, ...]
    placements: tuple


@st.composite
def shardings(draw, world: int, ndim: int) -> Sharding:
    pairs = [(a, world // a) for a in range(2, world) if world % a == 0]
    mesh = draw(st.sampled_from([(world,), *pairs])) if pairs else (world,)
    options = [Replicate()] + [Shard(d) for d in range(ndim)]
    return Sharding(mesh, tuple(draw(st.sampled_from(options)) for _ in mesh))


RESHARD_LAYOUTS = {"w": ComponentLayout("w", SharingPattern.GLOBAL),
                   "rep": ComponentLayout("rep", SharingPattern.REPLICATED),
                   "pr": ComponentLayout("pr", SharingPattern.PER_RANK)}


@dataclass
class ReshardCase:
    """A job saved at ``saved.world_size`` and loaded at ``current.world_size``.

    ``sharded``: fqn -> (shape, dtype, sharding at save, sharding at load), a GLOBAL component;
    ``replicated``: a REPLICATED component of plain tensors (chunked at save by ``policy``);
    ``per_rank``: a PER_RANK component whose topology policy is ``policy_name``.
    """

    saved: Topology
    current: Topology
    sharded: dict[str, tuple[tuple[int, ...], torch.dtype, Sharding, Sharding]]
    replicated: dict[str, tuple[int, ...]]
    policy: ChunkPolicy
    policy_name: object

    def state(self, rank: int, loading: bool) -> dict:
        world = (self.current if loading else self.saved).world_size
        sharded = {}
        for fqn, (shape, dtype, at_save, at_load) in self.sharded.items():
            sharding = at_load if loading else at_save
            assert math.prod(sharding.mesh_shape) == world
            sharded[fqn] = dtensor_on_rank(shape, dtype, sharding.mesh_shape, rank, sharding.placements)
        # DCP's load planner materialises meta tensors on the process group's device: load into real ones.
        device = "cpu" if loading else "meta"
        return {"w": sharded,
                "rep": {k: torch.empty(s, device=device) for k, s in self.replicated.items()},
                "pr": {"x": torch.empty(3, device=device), "step": rank}}

    def components(self) -> list[StateComponent]:
        holder = _PlainStateful()
        return [StateComponent("w", holder, "global"), StateComponent("rep", holder, "replicated"),
                StateComponent("pr", holder, "per_rank", on_topology_change=self.policy_name)]


class _PlainStateful:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _remap_modulo(new_rank: int, saved: Topology, current: Topology) -> int:
    return new_rank % saved.world_size


@st.composite
def reshard_cases(draw, max_world: int = 8) -> ReshardCase:
    n = draw(st.integers(1, max_world))
    m = draw(st.integers(1, max_world))
    sharded = {}
    for i in range(draw(st.integers(1, 3))):
        ndim = draw(st.integers(1, 3))
        shape = tuple(draw(st.lists(st.integers(1, 11), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64]))
        sharded[f"t{i}"] = (shape, dtype, draw(shardings(n, ndim)), draw(shardings(m, ndim)))
    replicated = {f"r{i}": tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=2)))
                  for i in range(draw(st.integers(1, 2)))}
    policy = ChunkPolicy(min_chunk_bytes=draw(st.sampled_from([64, 256, 1 << 20])),
                         chunks_per_holder=draw(st.integers(1, 3)))
    policy_name = draw(st.sampled_from(["rank0", _remap_modulo]))
    return ReshardCase(Topology(rank=0, world_size=n), Topology(rank=0, world_size=m), sharded, replicated,
                       policy, policy_name)


def save_metadata(case: ReshardCase) -> Metadata:
    """The checkpoint metadata a save of ``case`` at its saved world size produces."""
    states = [case.state(r, loading=False) for r in range(case.saved.world_size)]
    plans, planners = save_plans(states, RESHARD_LAYOUTS, case.saved, case.policy)
    return planners[0].create_global_plan(plans)[1]


def load_plans(case: ReshardCase, metadata: Metadata, key_maps: list[dict[str, str]]) -> list[LoadPlan]:
    """Every current rank's local load plan against ``metadata`` (in one process)."""
    plans = []
    for rank in range(case.current.world_size):
        planner = ForgeLoadPlanner(case.components(), case.current.with_rank(rank), key_map=key_maps[rank])
        planner.set_up_planner(case.state(rank, loading=True), metadata, is_coordinator=rank == 0)
        plans.append(planner.create_local_plan())
    return plans

# --- trainers: checkpoint retention and divergence detection -----------------------------------

# A metric value as evaluations produce them: mostly ordinary, sometimes tied, now and then NaN/inf.
metric_values = st.one_of(
    st.floats(0.0, 10.0, allow_nan=False).map(lambda v: round(v, 1)),  # rounding makes ties likely
    st.sampled_from([float("nan"), float("inf")]),
)


@st.composite
def save_eval_schedules(draw, max_events: int = 40) -> list[tuple[str, float | None]]:
    """A run's interleaving of evaluations ("eval", value) and saves ("save", None), in step order."""
    return draw(st.lists(st.one_of(st.tuples(st.just("eval"), metric_values),
                                   st.just(("save", None))), min_size=1, max_size=max_events))


@st.composite
def retention_policies(draw):
    from dcp_forge.manager.retention import RetentionPolicy

    return RetentionPolicy(save_total_limit=draw(st.one_of(st.none(), st.integers(1, 4))),
                           preserve_n_best=draw(st.integers(0, 3)), greater_is_better=draw(st.booleans()))


# Training losses: a falling curve with noise, and occasional spikes or NaNs.
loss_sequences = st.lists(st.one_of(st.floats(0.5, 4.0), st.floats(10.0, 100.0),
                                    st.sampled_from([float("nan"), float("inf")])), min_size=1, max_size=60)


@st.composite
def tilings(draw) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """A tensor shape and chunk boxes ``(offsets, sizes)`` that tile it exactly (a grid cut at random
    points along each dimension), then possibly damaged: a box dropped, repeated, moved or resized."""
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    cuts = []
    for size in shape:
        inner = sorted(draw(st.sets(st.integers(1, size - 1), max_size=3))) if size > 1 else []
        points = [0, *inner, size]
        cuts.append([(a, b - a) for a, b in zip(points, points[1:], strict=False)] or [(0, 0)])
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((), ())]
    for pieces in cuts:
        boxes = [(o + (start,), s + (length,)) for o, s in boxes for start, length in pieces]
    damage = draw(st.sampled_from(["none", "drop", "repeat", "move", "resize"]))
    if damage != "none" and boxes:
        i = draw(st.integers(0, len(boxes) - 1))
        offsets, sizes = boxes[i]
        if damage == "drop":
            del boxes[i]
        elif damage == "repeat":
            boxes.append(boxes[i])
        elif shape:
            dim = draw(st.integers(0, len(shape) - 1))
            delta = draw(st.sampled_from([-2, -1, 1, 2]))
            if damage == "move":
                offsets = offsets[:dim] + (offsets[dim] + delta,) + offsets[dim + 1:]
            else:
                sizes = sizes[:dim] + (max(0, sizes[dim] + delta),) + sizes[dim + 1:]
            boxes[i] = (offsets, sizes)
    return shape, draw(st.permutations(boxes))


# --- safetensors files --------------------------------------------------------------------------
SAFETENSORS_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                      torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.uint16,
                      torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2]


@st.composite
def safetensors_states(draw, max_tensors: int = 6) -> dict[str, torch.Tensor]:
    """Named tensors of every dtype safetensors stores, 0-3 dims (empty ones too), random bytes."""
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,8}", fullmatch=True).filter(lambda n: n != "__metadata__"),
                          min_size=1, max_size=max_tensors, unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in names:
        dtype = draw(st.sampled_from(SAFETENSORS_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=gen)
        state[name] = raw.view(dtype).reshape(shape) if dtype != torch.bool else (raw % 2).view(torch.bool).reshape(shape)
    return state


@st.composite
def tensor_boxes(draw, max_dims: int = 4, max_extent: int = 6):
    """A row-major shape and a box inside it: (shape, offsets, lengths)."""
    shape = tuple(draw(st.lists(st.integers(1, max_extent), min_size=1, max_size=max_dims)))
    offsets, lengths = [], []
    for extent in shape:
        start = draw(st.integers(0, extent - 1))
        offsets.append(start)
        lengths.append(draw(st.integers(1, extent - start)))
    return shape, tuple(offsets), tuple(lengths)


# Progress counts: small, and beyond float precision (a token count passes 2**53 on large runs).
progress_counts = st.one_of(st.integers(0, 1000), st.integers(2**53 - 2, 2**70))
# One training step's advance: (samples, tokens, steps).
progress_advances = st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 2**40), st.integers(0, 3)), max_size=20)


# --- exact values: every kind of value torch.save holds, in the layouts users hand over --------------

# Every dtype a dense tensor can be torch.save-d in (test_exact_values checks it against torch's dtypes).
SAVABLE_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex32, torch.complex64,
    torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu, torch.float4_e2m1fn_x2, torch.bits1x8, torch.bits2x4, torch.bits4x2, torch.bits8,
    torch.bits16,
)
# Dtypes whose negative view torch can resolve (torch._neg_view is accepted on any dtype, resolve_neg is
# not; complex32 resolves a negative or a conjugate view, not both: the save refuses that one).
NEGATABLE_DTYPES = frozenset({torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16,
                              torch.bfloat16, torch.float32, torch.float64, torch.complex32, torch.complex64,
                              torch.complex128})
# (dtype, scheme) pairs of quantized tensors: per tensor, per channel with integer zero points, and
# per channel with float zero points ("float_qparams", embeddings' quantization).
QUANTIZATIONS = (
    (torch.qint8, "tensor"), (torch.quint8, "tensor"), (torch.qint32, "tensor"), (torch.quint4x2, "tensor"),
    (torch.qint8, "channel"), (torch.quint8, "channel"), (torch.qint32, "channel"),
    (torch.quint8, "float_qparams"), (torch.quint4x2, "float_qparams"),
)
LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "offset")
SPARSE_KINDS = ("coo", "csr", "csc", "bsr")


def _compressed(dense: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "csr":
        return dense.to_sparse_csr()
    if kind == "csc":
        return dense.to_sparse_csc()
    return dense.to_sparse_bsr((2, 2))


@dataclass(frozen=True)
class TensorRecipe:
    """How to build one tensor value (hypothesis shows recipes, not megabytes of values).

    ``kind``: "dense", "quantized" (``quantization`` from QUANTIZATIONS), "coo" (``coalesced`` or
    not), "csr", "csc" or "bsr" (2x2 blocks). Dense tensors take ``layout`` (LAYOUTS) and lazy-view ``bits`` ("conj", "neg",
    "conj+neg"); values are ``seed``-random bytes (bools 0/1), so NaN payloads, -0.0, subnormals occur.
    """

    kind: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    seed: int
    layout: str = "contiguous"
    bits: str | None = None
    quantization: str | None = None
    coalesced: bool = True

    def _bytes(self, n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(self.seed))

    def _dense(self, shape: tuple[int, ...], dtype: torch.dtype, zeros: bool = False) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        raw = torch.zeros(n, dtype=torch.uint8) if zeros else self._bytes(n)  # bytes: bits dtypes have no zeros()
        if dtype == torch.bool:
            raw &= 1
        return raw.view(dtype).reshape(shape)

    def build(self) -> torch.Tensor:
        if self.kind == "quantized":
            return self._quantized()
        if self.kind in SPARSE_KINDS:
            return self._sparse()
        shape = self.shape
        if self.layout == "transposed":
            base = self._dense(shape[::-1], self.dtype)
            value = base.permute(*reversed(range(len(shape))))
        elif self.layout == "strided":
            value = self._dense((*shape[:-1], 2 * shape[-1]), self.dtype)[..., ::2] if shape else self._dense((), self.dtype)
        elif self.layout == "expanded":
            value = self._dense((1, *shape[1:]), self.dtype).expand(*shape) if shape else self._dense((), self.dtype)
        elif self.layout == "offset":
            value = self._dense((shape[0] + 3, *shape[1:]), self.dtype)[3:] if shape else self._dense((), self.dtype)
        else:
            value = self._dense(shape, self.dtype)
        if self.bits and "conj" in self.bits:
            value = value.conj()
        if self.bits and "neg" in self.bits:
            value = torch._neg_view(value)
        return value

    def _quantized(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.shape, generator=gen) * 4
        if self.quantization == "tensor":
            scale = float(torch.rand((), generator=gen, dtype=torch.float64)) + 1e-3
            zero = int(torch.randint(-3 if self.dtype == torch.qint32 else 0, 4, (), generator=gen))
            value = torch.quantize_per_tensor(x, scale, zero, self.dtype)
            if self.layout == "transposed" and len(self.shape) >= 2:
                value = torch.quantize_per_tensor(x.transpose(0, 1).contiguous(), scale, zero, self.dtype).transpose(0, 1)
            return value
        axis = int(torch.randint(0, len(self.shape), (), generator=gen))
        channels = self.shape[axis]
        if self.quantization == "channel":
            scales = torch.rand(channels, generator=gen, dtype=torch.float64) + 1e-3
            zeros = torch.randint(0, 4, (channels,), generator=gen)
        else:
            axis = 0
            channels = self.shape[0]
            scales = torch.rand(channels, generator=gen) + 1e-3
            zeros = torch.rand(channels, generator=gen)
        return torch.quantize_per_channel(x, scales, zeros, axis, self.dtype)

    def _sparse(self) -> torch.Tensor:
        dense = self._dense(self.shape, self.dtype)
        mask = self._bytes(math.prod(self.shape)).reshape(self.shape) < 96
        dense = dense * mask.to(self.dtype) if self.dtype != torch.bool else dense & mask
        if self.kind != "coo":
            return _compressed(dense, self.kind)
        sparse = dense.to_sparse()
        if not self.coalesced:  # every entry twice: uncoalesced, stored and compared as it is
            indices = torch.cat([sparse.indices(), sparse.indices()], dim=1)
            values = torch.cat([sparse.values(), sparse.values()])
            sparse = torch.sparse_coo_tensor(indices, values, self.shape)
        return sparse

    def destination(self) -> torch.Tensor:
        """A fresh tensor of the same kind, filled differently (zeros; another quantization), for the
        load to overwrite: with the same flags, and strides where they give it memory of its own."""
        if self.kind == "quantized":
            return torch.quantize_per_tensor(torch.zeros(self.shape), 0.5, 1, torch.quint8)
        if self.kind in SPARSE_KINDS:
            zeros = torch.zeros(self.shape, dtype=self.dtype)
            return zeros.to_sparse() if self.kind == "coo" else _compressed(zeros, self.kind)
        shape = self.shape
        if self.layout == "transposed":
            dest = self._dense(shape[::-1], self.dtype, zeros=True).permute(*reversed(range(len(shape))))
        else:
            dest = self._dense(shape, self.dtype, zeros=True)
        if self.bits and "conj" in self.bits:
            dest = dest.conj()
        if self.bits and "neg" in self.bits:
            dest = torch._neg_view(dest)
        return dest


_small_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
_positive_shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


@st.composite
def dense_recipes(draw, max_elements: int = 4096) -> TensorRecipe:
    dtype = draw(st.sampled_from(SAVABLE_DTYPES))
    shape = draw(st.one_of(_small_shapes, st.lists(st.integers(1, 64), min_size=1, max_size=2).map(tuple)))
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "transposed" and len(shape) < 2:
        layout = "contiguous"
    both = ["conj+neg"] if dtype.is_complex and dtype != torch.complex32 else []
    bits = draw(st.sampled_from([None, None, "neg"] + (["conj", "conj", *both] if dtype.is_complex else [])))
    if bits and "neg" in bits and dtype not in NEGATABLE_DTYPES:
        bits = bits.replace("neg", "").strip("+") or None
    if math.prod(shape) > max_elements:
        shape = (max_elements,)
    return TensorRecipe("dense", dtype, shape, draw(st.integers(0, 2**31 - 1)), layout, bits)


@st.composite
def quantized_recipes(draw) -> TensorRecipe:
    dtype, scheme = draw(st.sampled_from(QUANTIZATIONS))
    shape = draw(_positive_shapes)
    if dtype == torch.quint4x2:  # two values per byte: an even count (sub-byte tensors pack whole bytes)
        shape = (*shape[:-1], 2 * shape[-1])
    layout = draw(st.sampled_from(["contiguous", "transposed"])) if scheme == "tensor" else "contiguous"
    return TensorRecipe("quantized", dtype, shape, draw(st.integers(0, 2**31 - 1)), layout, quantization=scheme)


@st.composite
def sparse_recipes(draw) -> TensorRecipe:
    kind = draw(st.sampled_from(SPARSE_KINDS))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int64, torch.complex64, torch.float16]))
    shape = tuple(2 * s for s in draw(st.lists(st.integers(1, 3), min_size=2, max_size=2)))  # whole 2x2 blocks for BSR
    return TensorRecipe(kind, dtype, shape, draw(st.integers(0, 2**31 - 1)), coalesced=draw(st.booleans()))


tensor_recipes = st.one_of(dense_recipes(), dense_recipes(), dense_recipes(), quantized_recipes(), sparse_recipes())

# Keys of every type dcp_forge records exactly (key_paths.storable_key); str keys are letters only, so
# that no two paths flatten to the same DCP name ("a.1" from {"a": {1: x}} and {"a.1": x}).
storable_keys = st.one_of(
    st.text(alphabet="abcdefgxyz_", min_size=1, max_size=5),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=True, width=64),
    st.none(),
    st.binary(max_size=3),
    st.tuples(st.integers(-5, 5), st.text(alphabet="ab", max_size=2)),
)

# Non-tensor leaves: pickled by DCP, loaded weights-only (NaN and -0.0 included). Not b'': pickle
# protocol 2 writes it as a call of builtins.bytes, which torch's weights-only loader refuses (so a
# save refuses it too; test_exact_values checks that).
plain_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80), st.floats(width=64), st.text(max_size=6),
              st.binary(min_size=1, max_size=6), st.complex_numbers(allow_nan=False),
              st.sets(st.integers(-9, 9), max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner)),
    max_leaves=5,
)


def _distinct(keys: list) -> bool:
    """No two keys equal (1 == 1.0 == True) or alike as strings (DCP names values by str(key))."""
    return len({k for k in keys}) == len(keys) == len({str(k) for k in keys})


@st.composite
def value_trees(draw, depth: int = 2, max_entries: int = 4, min_entries: int = 1) -> dict:
    """A state dict: keys of every storable type; leaves are TensorRecipes, plain values, lists of
    recipes (DCP walks those), tuples holding a recipe (pickled whole) and empty dicts."""
    keys = draw(st.lists(storable_keys, min_size=min_entries if depth == 2 else 0, max_size=max_entries)
                .filter(_distinct))
    tree = {}
    for key in keys:
        choice = draw(st.integers(0, 9))
        if choice <= 4:
            tree[key] = draw(tensor_recipes)
        elif choice == 5:
            tree[key] = draw(plain_values)
        elif choice == 6 and depth > 0:
            tree[key] = draw(value_trees(depth - 1, 3))  # may be empty
        elif choice == 7:
            tree[key] = draw(st.lists(tensor_recipes, min_size=1, max_size=2))
        elif choice == 8:
            tree[key] = (draw(tensor_recipes), draw(plain_values))
        else:
            tree[key] = draw(tensor_recipes)
    return tree


def build_values(tree, destination: bool = False):
    """The values a recipe tree describes (``destination``: fresh ones of the same kinds to load into)."""
    if isinstance(tree, TensorRecipe):
        return tree.destination() if destination else tree.build()
    if isinstance(tree, dict):
        return {k: build_values(v, destination) for k, v in tree.items()}
    if isinstance(tree, list):
        return [build_values(v, destination) for v in tree]
    if isinstance(tree, tuple) and any(isinstance(v, TensorRecipe) for v in tree):
        return None if destination else tuple(build_values(v) for v in tree)  # pickled whole: replaced
    return None if destination else tree


# --- storage tiers ----------------------------------------------------------------------------------
@st.composite
def node_layouts(draw, max_nodes: int = 6, max_per_node: int = 4) -> Topology:
    """A job whose nodes may differ in size and whose ranks may interleave across nodes."""
    sizes = draw(st.lists(st.integers(1, max_per_node), min_size=1, max_size=max_nodes))
    node_of = draw(st.permutations([n for n, size in enumerate(sizes) for _ in range(size)]))
    return Topology(rank=0, world_size=len(node_of), node_of_rank=tuple(node_of))


@st.composite
def stored_items(draw, max_items: int = 6) -> tuple[bytes, list]:
    """A data file's bytes and its index rows, as the writer stores them: items back to back (some
    empty) and, drawn or not, a pack of small tensors whose items overlap (format/pack.py), each
    row with the xxh3 of the bytes it owns."""
    import xxhash

    from dcp_forge.format.index import ItemRecord
    from dcp_forge.format.pack import pack_in_memory

    def row(i: int, offset: int, length: int, checksum: str, gap: tuple[int, int] | None = None) -> ItemRecord:
        return ItemRecord(component="box", pattern="replicated", storage_key="box", fqn=f"box.x{i}",
                          kind="bytes", dtype=None, shape=None, chunk_offsets=None, chunk_sizes=None,
                          file="__0_0.distcp", offset=offset, length=length, checksum=checksum, rank=0,
                          gap_offset=gap[0] if gap else None, gap_length=gap[1] if gap else None)

    blobs = draw(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=max_items))
    packed = draw(st.lists(st.integers(0, 12), max_size=4))
    pack_at = draw(st.integers(0, len(blobs)))
    rows, parts, offset = [], [], 0
    for i, blob in enumerate(blobs):
        if i == pack_at and packed:
            data, items = pack_in_memory([torch.arange(n, dtype=torch.int16) for n in packed])
            rows += [row(len(blobs) + j, offset + it.offset, it.length, it.checksum, (it.gap_offset, it.gap_length))
                     for j, it in enumerate(items)]
            parts.append(data)
            offset += len(data)
        rows.append(row(i, offset, len(blob), xxhash.xxh3_64_hexdigest(blob)))
        parts.append(blob)
        offset += len(blob)
    return b"".join(parts), rows


@dataclass(frozen=True)
class StagingCase:
    """Tensors around an overlapped staging's size threshold, and in-place edits made after the call:
    ``edits`` lists (tensor name, declared) in order; a declared edit waits for the staging first."""

    tensors: dict[str, torch.Tensor]
    edits: tuple[tuple[str, bool], ...]
    lazy_min_bytes: int


@st.composite
def staging_cases(draw, lazy_min_bytes: int = 4096) -> StagingCase:
    count = draw(st.integers(1, 4))
    elements = lazy_min_bytes // 4
    tensors: dict[str, torch.Tensor] = {}
    for i in range(count):  # below, at and above the threshold
        numel = draw(st.sampled_from([1, elements // 2, elements - 1, elements, 2 * elements + 3]))
        tensors[f"t{i}"] = torch.arange(numel, dtype=torch.float32) * (i + 1)
    for name in draw(st.lists(st.sampled_from(sorted(tensors)), unique=True, max_size=2)):
        base = tensors[name]
        if base.numel() > 2:
            tensors[f"{name}_view"] = base[1:]  # shares its base's storage, and so its fate
    edits = draw(st.lists(st.tuples(st.sampled_from(sorted(tensors)), st.booleans()), max_size=4))
    return StagingCase(tensors, tuple(edits), lazy_min_bytes)
