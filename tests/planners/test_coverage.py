"""A save commits only what makes up the whole: write results against the global plan, every tensor
tiled by its chunks (a copy holding part of a DTensor: no overlap, and a load from it fills what the
rank loads), and the writer and planner refusing a save that lacks a rank."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.storage import WriteResult

from dcp_forge import (
    CheckpointCoordinator,
    IncompleteSaveError,
    StateComponent,
    latest_checkpoint,
    verify_checkpoint,
)
from dcp_forge.core.components import layouts_from
from dcp_forge.core.coverage import metadata_gaps, write_result_gaps
from dcp_forge.core.keys import StorageKey
from dcp_forge.core.patterns import SharingPattern
from dcp_forge.core.placement import ChunkPolicy, index_key
from dcp_forge.core.tensors import tiling_problem
from dcp_forge.core.topology import Topology
from dcp_forge.errors import first_rank_failure
from dcp_forge.planners import ForgeSavePlanner
from dcp_forge.storage import (
    CheckpointState,
    ForgeStorageWriter,
    checkpoint_state,
    coverage_problems,
    open_backend,
)
from dcp_forge.storage.cross_check import holds_part, unfilled_problems
from tests.support.statefuls import Box
from tests.support.strategies import (
    jobs,
    local_plans,
    reshard_cases,
    save_metadata,
    save_plans,
    tilings,
)

SETTINGS = settings(max_examples=100, deadline=None)


def _stored(fqn: str, rows: list[tuple[int, int]]) -> Metadata:
    """Metadata of an 8 x 8 float tensor ``fqn`` stored as the row ranges ``rows``."""
    chunks = [ChunkStorageMetadata(torch.Size([start, 0]), torch.Size([stop - start, 8])) for start, stop in rows]
    return Metadata({fqn: TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([8, 8]), chunks)})


COPY = str(StorageKey("model", SharingPattern.PER_GROUP, group_name="tp_group", group_ranks=(0, 2)))


def test_a_per_group_copy_may_hold_part_of_a_dtensor_but_one_logical_value_may_not():
    # DP x TP keeps one PER_GROUP copy per tensor-parallel shard: its chunks cover that shard only.
    for fqn, whole in [(f"{COPY}.w", False), ("model.w", True)]:
        assert holds_part(fqn) is not whole
        problems = coverage_problems(_stored(fqn, [(0, 4)]), [fqn], "ckpt")
        assert [p.message for p in problems] == (
            [f"ckpt/.metadata: tensor {fqn!r} of component 'model' cannot be loaded exactly: its chunks cover "
             "32 of its 64 elements"] if whole else [])
    assert coverage_problems(_stored(f"{COPY}.w", [(0, 5), (4, 8)]), [f"{COPY}.w"], "ckpt")  # still no overlap


def test_a_load_from_a_copy_holding_part_must_fill_what_this_rank_loads():
    fqn = f"{COPY}.w"
    for rows, filled in [([(0, 4)], 32), ([(0, 4), (4, 8)], 64)]:
        metadata = _stored(fqn, rows)
        destination = {fqn: torch.zeros(8, 8)}  # a rank that loads the whole tensor from this copy
        plan = create_default_local_load_plan(destination, metadata, True)
        problems = unfilled_problems(metadata, plan.items, destination, "ckpt")
        assert [p.message for p in problems] == ([] if filled == 64 else [
            f"ckpt/.metadata: tensor {fqn!r} of component 'model' cannot be loaded exactly: its stored chunks "
            "hold 32 of the 64 elements this rank loads"])


@settings(max_examples=40, deadline=None)
@given(reshard_cases(max_world=6))
def test_real_dtensor_saves_tile_every_tensor(case):
    metadata = save_metadata(case)
    assert coverage_problems(metadata, metadata.state_dict_metadata, "ckpt") == []


@SETTINGS
@given(jobs(max_world=6), st.data())
def test_write_results_must_cover_every_planned_item_of_every_rank(job, data):
    plans, planners = local_plans(job)
    global_plans, metadata = planners[0].create_global_plan(plans)
    assert coverage_problems(metadata, metadata.state_dict_metadata, "ckpt") == []
    results = [[WriteResult(item.index, 1, None) for item in plan.items] for plan in global_plans]
    assert write_result_gaps(global_plans, results).problems == []

    rank = data.draw(st.integers(0, len(results) - 1))
    without_rank = [None if r == rank else got for r, got in enumerate(results)]
    assert any(f"rank {rank} returned no write results" in p for p in write_result_gaps(global_plans, without_rank).problems)
    assert write_result_gaps(global_plans, results[:rank]).problems  # fewer ranks reported than planned
    if results[rank]:
        dropped = data.draw(st.integers(0, len(results[rank]) - 1))
        short = [got if r != rank else got[:dropped] + got[dropped + 1:] for r, got in enumerate(results)]
        assert any(p.startswith(f"rank {rank} wrote") for p in write_result_gaps(global_plans, short).problems)
        doubled = [got if r != rank else got + got[:1] for r, got in enumerate(results)]
        assert any(f"rank {rank} reported" in p for p in write_result_gaps(global_plans, doubled).problems)


# --- the writer and planner refuse -------------------------------------------------------------

TOPOLOGY = Topology.uniform(0, 2)
STATE = {"w": torch.arange(4096, dtype=torch.float32), "step": 3}


def _two_rank_save(path: str):
    """Both ranks' plans and writes of one REPLICATED component, in one process (as DCP runs them)."""
    layouts = layouts_from({"model": SharingPattern.REPLICATED})
    plans, planners = save_plans([{"model": dict(STATE)}] * 2, layouts, TOPOLOGY,
                                 ChunkPolicy(min_chunk_bytes=1024, chunks_per_holder=2))
    global_plans, metadata = planners[0].create_global_plan(plans)
    writer = ForgeStorageWriter(path)
    writer.set_up_storage_writer(True, rank=0)
    central = writer.prepare_global_plan(global_plans)
    results = [writer.write_data(planners[r].finish_plan(central[r]), planners[r]).value() for r in range(2)]
    assert all(results), "both ranks must write something for this test to mean anything"
    return writer, metadata, results


def test_finish_refuses_results_missing_a_rank_or_an_item_and_commits_the_whole(tmp_path):
    path = str(tmp_path / "c")
    writer, metadata, results = _two_rank_save(path)
    backend, native = open_backend(path)
    for partial, said in [([results[0]], r"results came from 1 rank\(s\), the plan has 2"),
                          ([results[0], None], "rank 1 returned no write results"),
                          ([results[0], results[1][:-1]], "rank 1 wrote"),
                          ([results[0], []], "rank 1 wrote 0 of its")]:
        with pytest.raises(IncompleteSaveError, match=said) as err:
            writer.finish(metadata, partial)
        assert "not committing checkpoint" in str(err.value)
        assert checkpoint_state(backend, native) is CheckpointState.PARTIAL
        assert latest_checkpoint(tmp_path) is None
    writer.finish(metadata, results)  # the complete results commit
    assert latest_checkpoint(tmp_path) == path and verify_checkpoint(path) == []
    loaded = Box({"w": torch.zeros(4096), "step": 0})
    CheckpointCoordinator([StateComponent("model", loaded, "replicated")], output_dir=tmp_path).load_checkpoint(path)
    assert torch.equal(loaded.state["w"], STATE["w"]) and loaded.state["step"] == 3


def test_a_save_planned_by_fewer_ranks_than_the_topology_writes_nothing(tmp_path):
    # What DCP does when torch.distributed's default group is gone as a (background) save starts:
    # it saves as a single process, so one rank's plan alone reaches the global planning step.
    path = str(tmp_path / "c")
    planner = ForgeSavePlanner({"model": "replicated"}, TOPOLOGY.with_rank(1))
    with pytest.raises(BaseException) as err:
        dcp.save({"model": Box(dict(STATE))}, storage_writer=ForgeStorageWriter(path), planner=planner, no_dist=True)
    original = first_rank_failure(err.value)
    assert isinstance(original, IncompleteSaveError)
    assert "planned by 1 rank(s), but the topology has 2 (rank 1)" in str(original)
    assert not os.path.exists(path)  # not even claimed


@SETTINGS
@given(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.data())
def test_unstored_pieces_are_exactly_the_listed_pieces_without_a_result(kinds, data):
    """Bytes values, whole tensors and tensors in row-chunks; any subset of their pieces stored."""
    entries, pieces = {}, []
    for i, chunks in enumerate(kinds):
        fqn = f"model.v{i}"
        if chunks == 0:
            entries[fqn] = BytesStorageMetadata()
            pieces.append(MetadataIndex(fqn))
            continue
        rows = [ChunkStorageMetadata(torch.Size([r, 0]), torch.Size([1, 2])) for r in range(chunks)]
        entries[fqn] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([chunks, 2]), rows)
        pieces += [MetadataIndex(fqn, row.offsets) for row in rows]
    stored = data.draw(st.lists(st.sampled_from(pieces), unique=True))
    expected = {}
    for piece in pieces:
        if piece not in stored:
            expected.setdefault(piece.fqn, []).append(piece)
    assert metadata_gaps(Metadata(entries), set(map(index_key, stored))).unstored == dict(sorted(expected.items()))


# --- the commit's one walk over results and one over metadata find every defect ------------------------


@pytest.fixture(scope="module")
def two_rank_save(tmp_path_factory):
    """One real two-rank save's writer, metadata and results; examples damage copies of them."""
    return _two_rank_save(str(tmp_path_factory.mktemp("save") / "c"))


def _damaged(defect: str, metadata: Metadata, results: list, data) -> tuple[Metadata, list, str]:
    """Copies of a sound save's ``metadata`` and ``results`` with one ``defect``, and what the refusal says."""
    metadata, results = copy.deepcopy(metadata), [list(got) for got in results]
    rank = data.draw(st.integers(0, 1), label="rank")
    at = data.draw(st.integers(0, len(results[rank]) - 1), label="result")
    result = results[rank][at]
    if defect == "missing":
        del results[rank][at]
        return metadata, results, f"rank {rank} wrote {len(results[rank])} of its"
    if defect == "duplicated":
        results[rank].append(result)
        return metadata, results, f"rank {rank} reported 1 item(s) not planned there"
    if defect == "unplanned":
        results[rank].append(WriteResult(MetadataIndex("model.ghost"), 1, result.storage_data))
        return metadata, results, f"rank {rank} reported 1 item(s) not planned there: model.ghost"
    if defect == "moved":  # reported by the other rank than the one it was planned on
        results[1 - rank].append(results[rank].pop(at))
        return metadata, results, f"rank {1 - rank} reported 1 item(s) not planned there"
    if defect == "no rank":
        results[rank] = None
        return metadata, results, f"rank {rank} returned no write results"
    if defect == "unstored":  # the metadata lists a value no rank wrote
        metadata.state_dict_metadata["model.ghost"] = BytesStorageMetadata()
        return metadata, results, "1 piece(s) of 'model.ghost' in the metadata have no write result"
    # The chunks of "model.w" (cut into four row-chunks) no longer tile it.
    chunks = metadata.state_dict_metadata["model.w"].chunks
    chunk = chunks[data.draw(st.integers(0, len(chunks) - 1), label="chunk")]
    if defect == "gap":
        chunk.sizes = torch.Size([chunk.sizes[0] - 1])
        return metadata, results, "tensor 'model.w' of component 'model' cannot be loaded exactly: its chunks cover"
    chunk.offsets = torch.Size([chunk.offsets[0] + 1])  # "shifted": it overlaps its neighbour or leaves the tensor
    return metadata, results, "tensor 'model.w' of component 'model' cannot be loaded exactly"


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["missing", "duplicated", "unplanned", "moved", "no rank", "unstored", "gap", "shifted"]),
       st.data())
def test_each_kind_of_defect_is_refused_by_the_commit(two_rank_save, defect, data):
    writer, metadata, results = two_rank_save
    assert len(metadata.state_dict_metadata["model.w"].chunks) > 1
    damaged, partial, said = _damaged(defect, metadata, results, data)
    with pytest.raises(IncompleteSaveError, match="not committing checkpoint") as err:
        writer.finish(damaged, partial)
    assert said in str(err.value)
    backend, native = open_backend(writer.url)
    assert checkpoint_state(backend, native) is CheckpointState.PARTIAL


@SETTINGS
@given(st.lists(tilings(), min_size=1, max_size=5))
def test_the_metadata_walk_leaves_out_only_tensors_whose_chunks_tile_them(cases):
    """Every tensor the walk takes for one whole chunk is tiled by it: the commit checks the others."""
    entries = {}
    for i, (shape, boxes) in enumerate(cases):
        chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
        entries[f"model.t{i}"] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), chunks)
    metadata = Metadata(entries)
    gaps = metadata_gaps(metadata, set())
    for fqn, md in entries.items():
        if fqn not in gaps.not_whole:
            assert tiling_problem(md.size, [(c.offsets, c.sizes) for c in md.chunks]) is None
    assert coverage_problems(metadata, gaps.not_whole, "ckpt") == coverage_problems(metadata, entries, "ckpt")
    assert sorted(gaps.unstored) == sorted(fqn for fqn, md in entries.items() if md.chunks)


@SETTINGS
@given(jobs(max_world=4), st.data())
def test_the_written_keys_are_those_of_every_result(job, data):
    plans, planners = local_plans(job)
    global_plans, _ = planners[0].create_global_plan(plans)
    results = [[WriteResult(item.index, 1, None) for item in plan.items] for plan in global_plans]
    if data.draw(st.booleans()):
        results[data.draw(st.integers(0, len(results) - 1))] = None
    gaps = write_result_gaps(global_plans, results)
    every = {(result.index.fqn, result.index.offset) for got in results if got is not None for result in got}
    assert {key for key in every if key in gaps.written} == every
