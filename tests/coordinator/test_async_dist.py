"""Async save on 2 real gloo ranks (one spawn per mode, several scenarios): byte-identical to a sync
save, exact under mutation while the training loop runs its own collectives, DTensor shards, a staging
failure on one rank raised on every rank, background failures raised on every rank, and a
replication check (validate=True) that judges the state of the call. Every scenario runs with staging
at the call and uploads on a thread (the default), with overlapped staging (changes declared with
``mutating()``), and with overlapped staging and upload processes (DTensors and the writer's state
travel to them; their own process group commits)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from dcp_forge import (
    AsyncOptions,
    AsyncSaveError,
    CheckpointCoordinator,
    CheckpointExistsError,
    ReplicationError,
    StateComponent,
)
from dcp_forge.core.placement import ChunkPolicy
from dcp_forge.format.names import METADATA_FILE
from dcp_forge.format.safe_load import load_dcp_metadata
from tests.support.statefuls import Box
from tests.support.states import assert_same, empty_like_state, mutate_in_place, snapshot, tricky_state

SMALL_CHUNKS = ChunkPolicy(min_chunk_bytes=4096, chunks_per_holder=2)


def _components(rank: int, world: int, seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(seed)  # identical on every rank: REPLICATED must be identical
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 16))
    mesh = init_device_mesh("cpu", (world,))
    sharded = distribute_tensor(torch.arange(64 * 8, dtype=torch.float32).view(64, 8) * seed, mesh, [Shard(0)])
    mine = tricky_state(100 * seed + rank)
    comps = [StateComponent("model", model, "replicated"), StateComponent("mine", Box(mine), "per_rank"),
             StateComponent("sharded", Box({"w": sharded}), "global")]
    return comps, model, mine, sharded


def _same_files(a: str, b: str, skip=("_CLAIMED", "_COMMITTED", "checkpoint_manifest.json")) -> bool:
    """Same data files and index byte for byte, and the same .metadata but for storage_meta (each save
    records its own id and path there, as DCP's FileSystemWriter does)."""
    names = sorted(set(os.listdir(a)) - set(skip))
    if names != sorted(set(os.listdir(b)) - set(skip)):
        return False
    if not all(Path(a, n).read_bytes() == Path(b, n).read_bytes() for n in names if n != METADATA_FILE):
        return False
    first, second = (load_dcp_metadata(Path(d, METADATA_FILE).read_bytes(), name=METADATA_FILE) for d in (a, b))
    second.storage_meta = first.storage_meta
    return first == second


MODES = {"blocking-thread": AsyncOptions(),
         "overlapped-thread": AsyncOptions(staging="overlapped", lazy_min_bytes=1024),
         "overlapped-process": AsyncOptions(staging="overlapped", upload="process", lazy_min_bytes=1024)}


def scenarios(rank: int, world: int, root: str, mode: str) -> dict:
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    out: dict = {}
    options = MODES[mode]
    comps, model, mine, sharded = _components(rank, world, seed=1)
    coord = CheckpointCoordinator(comps, output_dir=root, chunk_policy=SMALL_CHUNKS, async_options=options)

    # 1. Same content as a sync save of the same state.
    coord.save_checkpoint(checkpoint_id="sync")
    handle = coord.async_save(checkpoint_id="async")
    out["async_path"] = handle.result(timeout=120)
    dist.barrier()
    out["identical"] = _same_files(os.path.join(root, "sync"), os.path.join(root, "async"))

    # 2. Mutate everything right after the call while the training loop runs its own collectives.
    expected_model = snapshot(dict(model.state_dict()))
    expected_mine = snapshot(mine)
    expected_shard = sharded.to_local().clone()
    handle = coord.async_save(checkpoint_id="mutated")
    with coord.mutating(), torch.no_grad():  # a declared mutation point (overlapped: waits for the copy)
        mutate_in_place(mine)
        for p in model.parameters():
            p.mul_(-3)
        sharded.to_local().add_(1000)
    grad = torch.ones(1 << 12)
    for _ in range(30):  # the default (training) group stays usable while the upload runs
        dist.all_reduce(grad)
    out["training_collectives_ok"] = bool(torch.all(grad == world ** 30))
    path = handle.result(timeout=120)
    fresh, fresh_model, fresh_mine, fresh_sharded = _components(rank, world, seed=2)
    fresh_mine.clear()
    fresh_mine.update(empty_like_state(expected_mine))
    CheckpointCoordinator(fresh, output_dir=root).load_checkpoint(path)
    assert_same(dict(fresh_model.state_dict()), expected_model, "model")
    assert_same(fresh[1].stateful.state, expected_mine, "mine")
    out["dtensor_exact"] = torch.equal(fresh[2].stateful.state["w"].to_local(), expected_shard)
    out["mutation_exact"] = True

    # 3. A staging failure on rank 1 only: every rank raises, no save starts, the next one works.
    class Uncopyable:
        def __reduce_ex__(self, protocol):
            raise TypeError("rank 1 cannot copy this")

    mine["bad"] = Uncopyable() if rank == 1 else 0
    try:
        coord.async_save(checkpoint_id="never")
        out["staging_failure"] = "no error"
    except AsyncSaveError as err:
        out["staging_failure"] = f"AsyncSaveError: {err}"
    except TypeError as err:
        out["staging_failure"] = f"TypeError: {err}"
    dist.barrier()
    out["never_exists"] = os.path.exists(os.path.join(root, "never"))
    del mine["bad"]
    out["after_staging_failure"] = coord.async_save(checkpoint_id="after").result(timeout=120)

    # 4. A background failure (the id is taken) reaches every rank at result(); seen there, it costs
    # one checkpoint: the next save proceeds.
    handle = coord.async_save(checkpoint_id="after")
    try:
        handle.result(timeout=120)
        out["background_failure"] = "no error"
    except CheckpointExistsError as err:
        out["background_failure"] = type(err).__name__
    out["next_save"] = os.path.basename(coord.async_save(checkpoint_id="later").result(timeout=120))
    # Seen on rank 0 only (a done-callback there): the ranks agree, and every rank saves on.
    handle = coord.async_save(checkpoint_id="after")
    if rank == 0:
        handle.add_done_callback(lambda h: None)
    out["seen_on_one_rank"] = os.path.basename(coord.async_save(checkpoint_id="later-2").result(timeout=120))
    # Seen nowhere: the next save raises it on every rank, and saves nothing.
    coord.async_save(checkpoint_id="after")
    try:
        coord.async_save(checkpoint_id="never-2")
        out["unseen"] = "no error"
    except AsyncSaveError as err:
        out["unseen"] = type(err.__cause__).__name__
    dist.barrier()
    out["never_2_exists"] = os.path.exists(os.path.join(root, "never-2"))
    coord.close()
    out["closed_background_group"] = coord._async_saves.background_group is None

    # 5. validate=True: the replication check reads the live state, so its verdict comes before the
    # call returns; a mismatch raises on every rank and saves nothing.
    weights = Box({"w": torch.ones(256)})
    with CheckpointCoordinator([StateComponent("model", weights, "replicated", validate_replication=True)],
                               output_dir=os.path.join(root, "validated"), async_options=options) as checked:
        handle = checked.async_save(checkpoint_id="consistent", validate=True)
        with checked.mutating():
            weights.state["w"].add_(rank)  # now the replicas differ, after the call
        out["validated_consistent"] = os.path.basename(handle.result(timeout=120))
        try:  # staging at the call raises at the call; overlapped staging on the handle
            checked.async_save(checkpoint_id="diverged", validate=True).result(timeout=120)
            out["validated_diverged"] = "no error"
        except ReplicationError as err:
            out["validated_diverged"] = type(err).__name__
        dist.barrier()
        out["diverged_exists"] = os.path.exists(os.path.join(root, "validated", "diverged"))
    return out


@pytest.fixture(scope="module", params=sorted(MODES))
def outcome(ranks, tmp_path_factory, request):
    root = str(tmp_path_factory.mktemp("async_dist"))
    return ranks(scenarios, 2, root, request.param)


def test_async_checkpoint_is_byte_identical_to_a_sync_one(outcome):
    assert all(r["identical"] for r in outcome)


def test_exact_under_mutation_with_training_collectives_running(outcome):
    assert all(r["mutation_exact"] and r["training_collectives_ok"] for r in outcome)
    assert all(r["dtensor_exact"] for r in outcome)


def test_staging_failure_on_one_rank_raises_on_every_rank(outcome):
    assert outcome[1]["staging_failure"] == "TypeError: rank 1 cannot copy this"
    assert outcome[0]["staging_failure"].startswith("AsyncSaveError: async save not started: staging failed "
                                                    "on rank(s) [1] (rank 1: TypeError: rank 1 cannot copy this)")
    assert not any(r["never_exists"] for r in outcome)
    assert all(r["after_staging_failure"].endswith("after") for r in outcome)


def test_background_failure_reaches_every_rank_and_costs_one_checkpoint(outcome):
    assert [r["background_failure"] for r in outcome] == ["CheckpointExistsError"] * 2
    assert [r["next_save"] for r in outcome] == ["later"] * 2
    assert [r["seen_on_one_rank"] for r in outcome] == ["later-2"] * 2
    assert [r["unseen"] for r in outcome] == ["CheckpointExistsError"] * 2
    assert not any(r["never_2_exists"] for r in outcome)
    assert all(r["closed_background_group"] for r in outcome)


def test_validated_async_save_checks_the_state_of_the_call(outcome):
    assert [r["validated_consistent"] for r in outcome] == ["consistent"] * 2
    assert [r["validated_diverged"] for r in outcome] == ["ReplicationError"] * 2
    assert not any(r["diverged_exists"] for r in outcome)
