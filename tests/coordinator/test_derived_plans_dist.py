"""Saves planned on every rank by itself, on real gloo ranks: 8 ranks on two simulated nodes save a
training job's mix of state twice (the second save reuses the first one's plans, through the async
path), then 4 and 2 ranks load it, resharding, bit for bit; plain DCP reads it too.

The mix: a REPLICATED model (data parallel), a PER_GROUP pipeline stage whose structure differs
between the two stages (data parallel x pipeline parallel), GLOBAL DTensors under FSDP2 (HSDP on a
2 x 4 mesh, and a 1-D mesh with empty shards), a PER_NODE cache, a PER_RANK RNG and a GLOBAL step.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dcp_forge import CheckpointCoordinator, StateComponent, latest_checkpoint, read_manifest
from tests.support.statefuls import Box

STAGES = 2


def stage_state(stage: int, version: int) -> dict:
    """Each pipeline stage holds different layers (a different structure per PER_GROUP group)."""
    torch.manual_seed(100 + stage)
    layers = {f"layers.{stage}.w": torch.randn(6, 4 + stage) + version}
    if stage == STAGES - 1:
        layers["head.b"] = torch.randn(3) + version
    return layers


def global_values(version: int) -> dict:
    torch.manual_seed(7)
    return {"hsdp": torch.randn(16, 3) + version, "tiny": torch.arange(15.0).reshape(5, 3) + version}


def replicated_values(version: int) -> dict:
    torch.manual_seed(3)
    return {"embed": torch.randn(64, 8) + version, "norm": torch.ones(8) * version}


def _meshes(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return (init_device_mesh("cpu", (2, world // 2)), init_device_mesh("cpu", (world,))) if world > 2 else \
        (init_device_mesh("cpu", (1, world)), init_device_mesh("cpu", (world,)))


def _dtensors(values: dict, world: int, loading: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hsdp_mesh, flat_mesh = _meshes(world)
    if loading:  # other placements than at save: reshard across dimensions too
        return {"hsdp": distribute_tensor(torch.zeros_like(values["hsdp"]), flat_mesh, [Shard(1)]),
                "tiny": distribute_tensor(torch.zeros_like(values["tiny"]), hsdp_mesh, [Shard(0), Replicate()])}
    return {"hsdp": distribute_tensor(values["hsdp"], hsdp_mesh, [Replicate(), Shard(0)]),
            "tiny": distribute_tensor(values["tiny"], flat_mesh, [Shard(0)])}  # 5 rows over 8: empty shards


def saved_rank_of(new_rank, saved, current):
    """A rank of the loading job takes the copy of the saved rank with its number."""
    return new_rank % saved.world_size


def saved_node_of(new_rank, saved, current):
    return saved.ranks_on_node(current.node_of_rank[new_rank] % saved.num_nodes)[0]


def _job(rank: int, world: int, version: int, loading: bool) -> tuple[list[StateComponent], dict, dict]:
    stage = rank % min(STAGES, world)
    stage_groups = [tuple(range(s, world, min(STAGES, world))) for s in range(min(STAGES, world))]
    groups = [dist.new_group(members, backend="gloo") for members in stage_groups]
    node = int(os.environ["GROUP_RANK"]) if not loading else rank * 2 // world
    boxes = {
        "model": Box({k: torch.zeros_like(v) for k, v in replicated_values(version).items()} if loading
                     else replicated_values(version)),
        "stage": Box({k: torch.zeros_like(v) for k, v in stage_state(stage, version).items()} if loading
                     else stage_state(stage, version)),
        "fsdp": Box(_dtensors(global_values(version), world, loading)),
        "cache": Box({"node": torch.full((4,), float(node + 10 * version))}),
        "rng": Box({"state": torch.full((5,), float(rank + 100 * version)), "seed": rank + version}),
        "trainer": Box({"step": 0 if loading else 500 + version}),
    }
    components = [
        StateComponent("model", boxes["model"], "replicated"),
        StateComponent("stage", boxes["stage"], "per_group", process_group_name="pp",
                       on_topology_change=saved_rank_of),
        StateComponent("fsdp", boxes["fsdp"], "global"),
        StateComponent("cache", boxes["cache"], "per_node", on_topology_change=saved_node_of),
        StateComponent("rng", boxes["rng"], "per_rank", on_topology_change=saved_rank_of),
        StateComponent("trainer", boxes["trainer"], "global"),
    ]
    return components, {"pp": groups[stage]}, boxes


def save_twice(rank: int, world: int, root: str) -> dict:
    warnings.simplefilter("ignore")
    components, groups, boxes = _job(rank, world, version=0, loading=False)
    with CheckpointCoordinator(components, groups, output_dir=root, node=os.environ["GROUP_RANK"]) as coord:
        coord.save_checkpoint(checkpoint_id="first")
        first_hits = coord.plan_cache.hits
        # New values in place, same structure: the second save reuses every rank's plan.
        for name, values in (("model", replicated_values(1)), ("stage", stage_state(rank % STAGES, 1))):
            for key, value in values.items():
                boxes[name].state[key].copy_(value)
        for key, value in global_values(1).items():
            dtensor = boxes["fsdp"].state[key]
            from torch.distributed.tensor import distribute_tensor

            dtensor.to_local().copy_(distribute_tensor(value, dtensor.device_mesh, dtensor.placements).to_local())
        boxes["cache"].state["node"] += 10
        boxes["rng"].state["state"] += 100
        boxes["rng"].state["seed"] += 1
        boxes["trainer"].state["step"] += 1
        coord.async_save(checkpoint_id="second").result()
        return {"first_hits": first_hits, "second_hits": coord.plan_cache.hits}


def load_resharded(rank: int, world: int, root: str) -> dict:
    warnings.simplefilter("ignore")
    components, groups, boxes = _job(rank, world, version=1, loading=True)
    with CheckpointCoordinator(components, groups, output_dir=root, node=rank * 2 // world) as coord:
        result = coord.load_checkpoint()
    stage = rank % min(STAGES, world)
    expected = {
        "model": replicated_values(1),
        "stage": stage_state(stage, 1),  # saved rank `rank` (same stage) held this stage's copy
        "cache": {"node": torch.full((4,), float(rank * 2 // world % 2 + 10))},
        "rng": {"state": torch.full((5,), float(rank + 100)), "seed": rank + 1},
        "trainer": {"step": 501},
    }
    bad = [f"{name}.{key}" for name, values in expected.items() for key, value in values.items()
           if not (torch.equal(boxes[name].state[key], value) if isinstance(value, torch.Tensor)
                   else boxes[name].state[key] == value)]
    bad += [f"fsdp.{key}" for key, value in global_values(1).items()
            if not torch.equal(boxes["fsdp"].state[key].full_tensor(), value)]
    return {"bad": bad, "loaded": result.loaded}


def test_eight_ranks_save_twice_from_their_declarations_and_load_resharded_bit_exact(ranks, tmp_path):
    root = str(tmp_path / "run")
    hits = ranks(save_twice, 8, root, ranks_per_node=4)
    assert all(h == {"first_hits": 0, "second_hits": 1} for h in hits), hits
    second = latest_checkpoint(root)
    assert second is not None and second.endswith("second")
    assert read_manifest(second).world_size == 8
    for world in (4, 2):
        for outcome in ranks(load_resharded, world, root):
            assert outcome["bad"] == [], (world, outcome)
            assert len(outcome["loaded"]) == 6
    # Plain DCP reads the checkpoint whole: the replicated model and every DTensor, exactly.
    plain = {"model": {k: torch.zeros_like(v) for k, v in replicated_values(1).items()}}
    dcp.load(plain, checkpoint_id=second, no_dist=True)
    assert all(torch.equal(plain["model"][k], v) for k, v in replicated_values(1).items())
    dcp_to_torch_save(second, str(tmp_path / "whole.pt"))
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert all(torch.equal(whole["fsdp"][k], v) for k, v in global_values(1).items())
    assert whole["trainer"]["step"] == 501 and torch.equal(whole["stage@pp[1-7:2]"]["head.b"],
                                                           stage_state(1, 1)["head.b"])


# --- falling back to DCP's gather, and failures reaching every rank ----------------------------

class _Unplannable:
    """A value DCP asks to plan itself, which fails to (on one rank only, below)."""

    def __create_write_items__(self, fqn: str, obj: object) -> list:
        raise ValueError(f"{fqn} cannot be planned here")


def _standalone_save(path: str, state: dict, cache) -> str:
    from dcp_forge.core.topology import Topology
    from dcp_forge.planners import ForgeSavePlanner
    from dcp_forge.rank_exchange import RankExchange
    from dcp_forge.storage import ForgeStorageWriter

    exchange = RankExchange(dist.group.WORLD)
    planner = ForgeSavePlanner({"rng": "per_rank"}, Topology.uniform(dist.get_rank(), dist.get_world_size()),
                               exchange=exchange, plan_cache=cache)
    dcp.save(state, storage_writer=ForgeStorageWriter(path, exchange=exchange), planner=planner,
             use_collectives=False)
    return planner.planned_by


def disagreeing_and_failing_saves(rank: int, world: int, root: str) -> dict:
    from dcp_forge.planners import PlanCache

    warnings.simplefilter("ignore")
    out = {}
    cache = PlanCache()
    # Keys nobody declared count as REPLICATED; rank 0 holding one more makes the ranks disagree:
    # the plans are gathered and placed on the coordinator, as DCP does, and the save is whole.
    extra = {"extra": torch.full((3,), 7.0)} if rank == 0 else {}
    state = {"model": {"w": torch.arange(6.0), **extra}, "rng": {"s": torch.full((2,), float(rank))}}
    out["disagreeing"] = _standalone_save(os.path.join(root, "odd"), state, cache)
    out["agreeing"] = _standalone_save(os.path.join(root, "even"), {"model": {"w": torch.arange(6.0)},
                                                                   "rng": state["rng"]}, cache)
    out["cached"] = _standalone_save(os.path.join(root, "again"), {"model": {"w": torch.arange(6.0) + 1},
                                                                  "rng": state["rng"]}, cache)

    def attempt(name: str, coord: CheckpointCoordinator, checkpoint_id: str) -> None:
        try:
            coord.save_checkpoint(checkpoint_id=checkpoint_id)
            out[name] = None
        except Exception as err:  # every rank must raise the same error
            out[name] = (type(err).__name__, str(err))
        out[f"{name}: left"] = sorted(os.listdir(os.path.join(root, name)))

    # One rank fails to plan: every rank raises that rank's error, and nothing stays behind.
    value = _Unplannable() if rank == 1 else 1
    attempt("unplannable", CheckpointCoordinator([StateComponent("mine", Box({"v": value}), "per_rank")],
                                                 output_dir=os.path.join(root, "unplannable")), "c")
    # The coordinator cannot claim the id: every rank raises, the committed checkpoint stays as it was.
    coord = CheckpointCoordinator([StateComponent("mine", Box({"v": torch.ones(2)}), "per_rank")],
                                  output_dir=os.path.join(root, "taken"))
    coord.save_checkpoint(checkpoint_id="c")
    attempt("taken", coord, "c")
    return out


def test_disagreeing_ranks_fall_back_to_the_gather_and_failures_reach_every_rank(ranks, tmp_path):
    root = str(tmp_path)
    outcomes = ranks(disagreeing_and_failing_saves, 3, root)
    for outcome in outcomes:
        assert (outcome["disagreeing"], outcome["agreeing"], outcome["cached"]) == ("gather", "declarations", "cache")
        kind, message = outcome["unplannable"]
        assert kind == "ValueError" and "mine@rank1.v cannot be planned here" in message, message
        assert outcome["unplannable: left"] == []
        assert outcome["taken"][0] == "CheckpointExistsError" and outcome["taken: left"] == ["c"]
    dcp_to_torch_save(os.path.join(root, "odd"), str(tmp_path / "odd.pt"))
    whole = torch.load(tmp_path / "odd.pt", weights_only=False)
    assert torch.equal(whole["model"]["extra"], torch.full((3,), 7.0))
    assert [whole[f"rng@rank{r}"]["s"][0].item() for r in range(3)] == [0.0, 1.0, 2.0]
    dcp_to_torch_save(os.path.join(root, "again"), str(tmp_path / "again.pt"))
    assert torch.equal(torch.load(tmp_path / "again.pt", weights_only=False)["model"]["w"], torch.arange(6.0) + 1)


# --- tensor parallelism inside data-parallel replicas: a DTensor copy per replica ---------------

def tp_in_dp_replicas(rank: int, world: int, root: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    warnings.simplefilter("ignore")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    values = {"w": torch.arange(32.0).reshape(8, 4), "b": torch.arange(3.0)}  # b: 3 rows over 2, uneven

    def state(zero: bool) -> dict:
        return {k: distribute_tensor(torch.zeros_like(v) if zero else v, mesh["tp"], [Shard(0)])
                for k, v in values.items()}

    out = {}
    same_shard = {"tp_group": mesh.get_group("dp")}  # the ranks holding the same tensor-parallel shard
    per_group = [StateComponent("model", Box(state(False)), "per_group", process_group_name="tp_group")]
    with CheckpointCoordinator(per_group, same_shard, output_dir=os.path.join(root, "per_group")) as coord:
        coord.save_checkpoint(checkpoint_id="c")
        out["derived"] = coord.plan_cache.plan is not None  # planned by declarations (a gather caches nothing)
    loaded = Box(state(True))
    with CheckpointCoordinator([StateComponent("model", loaded, "per_group", process_group_name="tp_group")],
                               same_shard, output_dir=os.path.join(root, "per_group")) as coord:
        coord.load_checkpoint()
    out["exact"] = all(torch.equal(loaded.state[k].full_tensor(), v) for k, v in values.items())
    # Declared GLOBAL, each replica's copy looks like the only one: refused, naming the fix.
    with CheckpointCoordinator([StateComponent("model", Box(state(False)), "global")],
                               output_dir=os.path.join(root, "global")) as coord:
        try:
            coord.save_checkpoint(checkpoint_id="c")
            out["global"] = None
        except Exception as err:  # every rank must raise it
            out["global"] = (type(err).__name__, str(err))
    out["global: left"] = sorted(os.listdir(os.path.join(root, "global")))
    return out


def test_tensor_parallel_copies_per_replica_are_one_copy_per_group(ranks, tmp_path):
    for outcome in ranks(tp_in_dp_replicas, 4, str(tmp_path)):
        assert outcome["derived"] and outcome["exact"], outcome
        kind, message = outcome["global"]
        assert kind == "IncompleteSaveError" and "declare it PER_GROUP" in message, message
        assert outcome["global: left"] == []
