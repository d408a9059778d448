"""Resume on another world size, on real gloo groups.

Saved at N and loaded at M for N, M in {1, 2, 4}, bit-exact, for three kinds of model + optimizer
state (optimizer in FQN form through ``OptimizerState``):

- ``fsdp``: FSDP2 ``fully_shard`` (Shard(0) DTensors, uneven: 5 and 3 rows over 2 or 4 ranks);
- ``placed``: DTensor parameters whose placements change between save and load
  (Shard(0) <-> Shard(1), Replicate <-> Shard), TP style;
- ``plain``: a replicated plain model (DDP style), REPLICATED.

World 1 runs in the test process on plain modules (DTensor checkpoint -> plain tensors and back).
The topology-change policies run 2 -> 4 and 2 -> 1 (rank0, reseed, a remap callable, skip, error,
a StatefulDataLoader), and read-once loading is measured at world 4 by counting storage reads (and
fails on every rank, without waiting, when one rank's item is corrupt).

Everything is bundled into three spawns (world 2, 4, 2) driven by one module-scoped fixture.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dcp_forge import (
    CheckpointCoordinator,
    IntegrityError,
    MissingComponentError,
    RNGState,
    StateComponent,
    TopologyChangeError,
    read_manifest,
)
from dcp_forge.statefuls import ModelState, OptimizerState
from tests.support.model_state import full_state, mismatches, train
from tests.support.statefuls import Box
from tests.support.tamper import data_files, flip_byte

KINDS = ("fsdp", "placed", "plain")
WORLDS = (1, 2, 4)


# --- the three model kinds -------------------------------------------------------------------

def _placements(loading: bool):
    from torch.distributed.tensor import Replicate, Shard

    if loading:
        return {"0.weight": Shard(1), "0.bias": Shard(0), "2.weight": Shard(0), "2.bias": Replicate()}
    return {"0.weight": Shard(0), "0.bias": Replicate(), "2.weight": Shard(1), "2.bias": Shard(0)}


def build(kind: str, seed: int, loading: bool):
    """A fresh model + AdamW of ``kind`` for the current world (plain modules without torch.distributed)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    if dist.is_initialized() and kind != "plain":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        if kind == "fsdp":
            fully_shard(model, mesh=mesh)
        else:
            for name, placement in _placements(loading).items():
                module, attr = name.split(".")
                param = getattr(model[int(module)], attr)
                setattr(model[int(module)], attr, nn.Parameter(distribute_tensor(param.detach(), mesh, [placement])))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def components(kind: str, model, opt) -> list[StateComponent]:
    pattern = "replicated" if kind == "plain" else "global"
    return [StateComponent("model", ModelState(model), pattern),
            StateComponent("optimizer", OptimizerState(model, opt), pattern)]


def save_kinds(root: str) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    for kind in KINDS:
        model, opt = build(kind, seed=0, loading=False)
        train(model, opt)
        where = os.path.join(root, f"{kind}-{world}")
        CheckpointCoordinator(components(kind, model, opt), output_dir=where).save_checkpoint(checkpoint_id="c")
        ref = full_state(model, opt)
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(ref, os.path.join(where, "reference.pt"))


def load_kinds(root: str, saved_worlds) -> dict:
    """Load every kind saved at each of ``saved_worlds`` into fresh state; mismatches per (kind, N)."""
    out = {}
    for kind in KINDS:
        for n in saved_worlds:
            model, opt = build(kind, seed=1, loading=True)
            where = os.path.join(root, f"{kind}-{n}")
            result = CheckpointCoordinator(components(kind, model, opt), output_dir=where).load_checkpoint()
            expected = torch.load(os.path.join(where, "reference.pt"), weights_only=False)
            out[(kind, n)] = {"bad": mismatches(expected, full_state(model, opt)), "loaded": result.loaded,
                              "complete": result.complete}
    return out


# --- topology-change policies ----------------------------------------------------------------

def node_index_copy(new_rank, saved, current):
    """New node k takes the copy saved node k held (the first saved rank on that node)."""
    return saved.ranks_on_node(current.node_of_rank[new_rank] % saved.num_nodes)[0]


def modulo_copy(new_rank, saved, current):
    return new_rank % saved.world_size


def even_ranks_only(new_rank, saved, current):
    return None if new_rank % 2 else 0


def boxed(value) -> Box:
    return Box({"value": value})


def make_loader(world: int, rank: int):
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    data = list(range(40))
    return StatefulDataLoader(data, batch_size=2, sampler=DistributedSampler(data, world, rank, shuffle=False))


def stage_groups():
    """Stage-replica groups of a DP x PP mesh (PP = 2 at world 4, 1 below); collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    pp = 2 if world == 4 else 1
    mine = None
    for stage in range(pp):
        members = list(range(stage, world, pp))
        pg = dist.new_group(members, backend="gloo") if dist.is_initialized() else None
        if not dist.is_initialized() or dist.get_rank() in members:
            mine = pg
    return {"stages": mine}


def policy_components(rank: int, fresh: bool, loader) -> list[StateComponent]:
    mark = -1 if fresh else rank
    return [
        StateComponent("rng", RNGState(), "per_rank", on_topology_change="reseed"),
        StateComponent("loader", loader, "per_rank", on_topology_change="rank0"),
        StateComponent("origin", boxed(mark), "per_rank", on_topology_change=modulo_copy),
        StateComponent("scratch", boxed(mark), "per_rank", required=False, on_topology_change="skip"),
        StateComponent("node_cache", boxed(mark if fresh else 100 + rank), "per_node",
                       on_topology_change=node_index_copy),
        StateComponent("stage", boxed(mark if fresh else 200), "per_group", process_group_name="stages",
                       on_topology_change="rank0"),
    ]


def save_policies(root: str) -> None:
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    random.seed(100 + rank)
    loader = make_loader(dist.get_world_size(), rank)
    batches = iter(loader)
    for _ in range(rank + 1):  # rank r has consumed r + 1 batches
        next(batches)
    comps = policy_components(rank, fresh=False, loader=loader)
    comps.append(StateComponent("strict", boxed(rank), "per_rank"))  # required, default policy: error
    CheckpointCoordinator(comps, stage_groups(), os.path.join(root, "policies")).save_checkpoint(checkpoint_id="c")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def load_policies(root: str) -> dict:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    loader = make_loader(world, rank)
    comps = policy_components(rank, fresh=True, loader=loader)
    by_key = {c.key: c.stateful for c in comps}
    handler = _Lines()
    log = logging.getLogger("dcp_forge.coordinator")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CheckpointCoordinator(comps, stage_groups(), os.path.join(root, "policies")).load_checkpoint(
                strict=False)
    finally:
        log.removeHandler(handler)
    out = {"origin": by_key["origin"].state["value"], "scratch": by_key["scratch"].state["value"],
           "node_cache": by_key["node_cache"].state["value"], "stage": by_key["stage"].state["value"],
           "next_batch": next(iter(loader)).tolist(), "draw": torch.rand(2).tolist(), "py": random.random(),
           "not_loaded": dict(result.not_loaded), "changes": list(result.topology_changes),
           "logged": [line for line in handler.lines if line.startswith("component ")],
           "warnings": [str(w.message) for w in caught]}
    try:
        CheckpointCoordinator([StateComponent("strict", boxed(-1), "per_rank")],
                              output_dir=os.path.join(root, "policies")).load_checkpoint(components=["strict"])
        out["strict_error"] = None
    except TopologyChangeError as err:
        out["strict_error"] = str(err)
    try:  # fails on odd ranks only: every rank must raise (none may wait in dcp.load for the others)
        CheckpointCoordinator([StateComponent("origin", boxed(-1), "per_rank", on_topology_change=even_ranks_only)],
                              output_dir=os.path.join(root, "policies")).load_checkpoint(components=["origin"])
        out["odd_rank_error"] = None
    except MissingComponentError as err:
        out["odd_rank_error"] = str(err)
    return out


# --- read-once ---------------------------------------------------------------------------------

def read_once_counts(root: str) -> dict:
    out = {}
    for read_once in (False, True):
        model, opt = build("plain", seed=1, loading=True)
        where = os.path.join(root, "plain-2")
        result = CheckpointCoordinator(components("plain", model, opt), output_dir=where).load_checkpoint(
            read_once=read_once)
        expected = torch.load(os.path.join(where, "reference.pt"), weights_only=False)
        out[read_once] = {"bytes_read": result.bytes_read, "bad": mismatches(expected, full_state(model, opt)),
                          "read_once": result.read_once}
    # A corrupt item is read by one rank only: the others must learn of it instead of waiting for its bytes.
    corrupt = os.path.join(root, "plain-2-corrupt")
    if dist.get_rank() == 0:
        shutil.copytree(os.path.join(root, "plain-2"), corrupt)
        path = os.path.join(corrupt, "c")
        largest = max(data_files(path), key=lambda f: os.path.getsize(os.path.join(path, f)))
        flip_byte(os.path.join(path, largest), os.path.getsize(os.path.join(path, largest)) // 2)
    dist.barrier()
    model, opt = build("plain", seed=1, loading=True)
    try:
        CheckpointCoordinator(components("plain", model, opt), output_dir=corrupt).load_checkpoint(read_once=True)
        out["corrupt"] = None
    except IntegrityError as err:
        out["corrupt"] = str(err)
    return out


# --- the spawned steps -------------------------------------------------------------------------

def step_world2(rank: int, world: int, root: str) -> dict:
    warnings.simplefilter("ignore")
    save_kinds(root)
    save_policies(root)
    return {"loads": load_kinds(root, (1, 2))}


def step_world4(rank: int, world: int, root: str) -> dict:
    warnings.simplefilter("ignore")
    save_kinds(root)
    return {"loads": load_kinds(root, (1, 2, 4)), "policies": load_policies(root), "read_once": read_once_counts(root)}


def step_world2_again(rank: int, world: int, root: str) -> dict:
    warnings.simplefilter("ignore")
    return {"loads": load_kinds(root, (4,))}


@pytest.fixture(scope="module")
def outcome(ranks, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reshard"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_kinds(root)  # world 1, in this process
    two = ranks(step_world2, 2, root, ranks_per_node=1)
    four = ranks(step_world4, 4, root, ranks_per_node=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = {"loads": load_kinds(root, (1, 2, 4)), "policies": load_policies(root)}
    two_again = ranks(step_world2_again, 2, root, ranks_per_node=1)
    loads = {}
    for world, results in ((1, [one]), (2, two), (4, four), (2, two_again)):
        for rank, r in enumerate(results):
            for (kind, n), info in r["loads"].items():
                loads[(kind, n, world, rank)] = info
    return {"root": root, "loads": loads, "policies4": [r["policies"] for r in four], "policies1": one["policies"],
            "read_once": [r["read_once"] for r in four]}


@pytest.mark.parametrize("m", WORLDS, ids=lambda m: f"load{m}")
@pytest.mark.parametrize("n", WORLDS, ids=lambda n: f"save{n}")
@pytest.mark.parametrize("kind", KINDS)
def test_model_and_optimizer_load_bit_exactly_on_another_world_size(outcome, kind, n, m):
    ranks = [(key, info) for key, info in outcome["loads"].items() if key[:3] == (kind, n, m)]
    assert len(ranks) == m
    for key, info in ranks:
        assert info["bad"] == [], f"{key}: values differ from what was saved: {info['bad'][:5]}"
        assert info["loaded"] == ("model", "optimizer") and info["complete"]


def test_manifest_shows_the_save_topology(outcome):
    manifest = read_manifest(os.path.join(outcome["root"], "policies", "c"))
    assert (manifest.world_size, manifest.num_nodes) == (2, 2)
    assert manifest.groups == {"stages": [[0, 1]]}
    assert manifest.describe_topology() == "world_size=2, nodes=2, stages=[[0, 1]]"


def test_rank0_and_remap_policies_choose_the_documented_copy(outcome):
    results = outcome["policies4"]
    assert [r["origin"] for r in results] == [0, 1, 0, 1]  # modulo_copy
    assert [r["node_cache"] for r in results] == [100, 100, 101, 101]  # new node k <- saved node k
    assert [r["stage"] for r in results] == [200] * 4  # rank0: the group holding saved rank 0
    assert outcome["policies1"]["origin"] == 0 and outcome["policies1"]["node_cache"] == 100


def test_dataloader_follows_its_policy(outcome):
    # rank0: every new rank resumes its own new shard at the position saved rank 0 had reached (1 batch)
    expected = [list(make_loader(4, r))[1].tolist() for r in range(4)]
    assert [r["next_batch"] for r in outcome["policies4"]] == expected
    assert outcome["policies1"]["next_batch"] == list(make_loader(1, 0))[1].tolist()


def test_reseed_gives_distinct_deterministic_streams(outcome):
    draws = [r["draw"] for r in outcome["policies4"]]
    assert len({tuple(d) for d in draws}) == 4  # every new rank its own stream
    assert len({r["py"] for r in outcome["policies4"]}) == 4
    # derived from saved rank 0's state and the new rank only: the world-1 load's rank 0 draws the same
    assert outcome["policies1"]["draw"] == draws[0]


def test_skip_keeps_fresh_state_with_a_warning(outcome):
    for r in [*outcome["policies4"], outcome["policies1"]]:
        assert r["scratch"] == -1
        assert "scratch" in r["not_loaded"] and "skip" in r["not_loaded"]["scratch"]
        assert any("'scratch'" in w and "skip" in w for w in r["warnings"])


def test_error_policy_names_component_and_both_topologies(outcome):
    for r in [*outcome["policies4"], outcome["policies1"]]:
        message = r["strict_error"]
        assert message is not None and "'strict'" in message
        assert "world_size=2, nodes=2" in message
    assert "world_size=4, nodes=2" in outcome["policies4"][0]["strict_error"]
    assert "world_size=1, nodes=1" in outcome["policies1"]["strict_error"]


def test_an_error_on_some_ranks_is_raised_on_every_rank(outcome):
    errors = [r["odd_rank_error"] for r in outcome["policies4"]]
    assert all(e is not None and "gives rank 1 no saved copy" in e for e in errors), errors
    assert outcome["policies1"]["odd_rank_error"] is None  # world 1: rank 0 gets saved rank 0's copy


def test_one_log_line_per_changed_component(outcome):
    rank0 = outcome["policies4"][0]
    assert len(rank0["changes"]) == 6  # rng, loader, origin, scratch, node_cache, stage
    assert rank0["logged"] == rank0["changes"]
    assert all(r["logged"] == [] for r in outcome["policies4"][1:])  # logged once, by rank 0
    text = "\n".join(rank0["changes"])
    assert "'rng' (PER_RANK): saved with world_size=2, nodes=2, now world_size=4, nodes=2: policy reseed" in text
    assert "reseeds it with its own rank" in text
    assert "policy remap(modulo_copy), ranks load 0<-origin@rank0, 1<-origin@rank1, 2<-origin@rank0" in text


def test_read_once_reads_each_unique_byte_once(outcome):
    manifest = read_manifest(os.path.join(outcome["root"], "plain-2", "c"))
    unique = manifest.components["model"].size_bytes + manifest.components["optimizer"].size_bytes
    plain = [r[False] for r in outcome["read_once"]]
    once = [r[True] for r in outcome["read_once"]]
    assert all(r["bad"] == [] for r in plain + once)
    assert [r["read_once"] for r in once] == [True] * 4
    assert sum(r["bytes_read"] for r in plain) == 4 * unique  # every rank reads everything
    assert sum(r["bytes_read"] for r in once) == unique  # read once: exactly the unique bytes


def test_a_corrupt_item_fails_the_read_once_load_on_every_rank(outcome):
    errors = [r["corrupt"] for r in outcome["read_once"]]
    assert all(e is not None and "checksum mismatch" in e for e in errors), errors
