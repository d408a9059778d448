"""Overlapped staging (``AsyncOptions(staging="overlapped")``) in one process: the call returns before
the large tensors are copied, training goes on, and the checkpoint still holds the state of the call
bit for bit (identical files to a sync save taken at the same step); an in-place change before the
next declared mutation point refuses the save instead of committing a torn copy; small state is
copied at the call; uploads in an upload process give the same checkpoint."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from dcp_forge import (
    AsyncOptions,
    CheckpointCoordinator,
    RNGState,
    StateComponent,
    UndeclaredMutationError,
    latest_checkpoint,
    list_checkpoints,
)
from dcp_forge.async_staging import ForgeStager
from dcp_forge.core.placement import ChunkPolicy
from tests.support.statefuls import Box, Counter
from tests.support.states import assert_same, empty_like_state, snapshot
from tests.support.strategies import StagingCase, staging_cases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OVERLAPPED = AsyncOptions(staging="overlapped", lazy_min_bytes=4096)
SMALL_CHUNKS = ChunkPolicy(min_chunk_bytes=4096, chunks_per_holder=2)


def _training(seed: int = 0):
    """A model with dropout (the forward pass draws from the RNG), AdamW, a step counter."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.Dropout(0.3), torch.nn.Linear(96, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    counter = Counter()
    comps = [StateComponent("model", model, "replicated"), StateComponent("optimizer", opt, "replicated"),
             StateComponent("progress", counter, "global"), StateComponent("rng", RNGState(), "per_rank")]
    return model, opt, counter, comps


def _step(model, opt, counter) -> None:
    model(torch.randn(16, 48)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    counter.step += 1


def _data_files_equal(a: str, b: str) -> None:
    skip = {"_CLAIMED", "_COMMITTED", "checkpoint_manifest.json", ".metadata"}
    names = sorted(set(os.listdir(a)) - skip)
    assert names == sorted(set(os.listdir(b)) - skip) and "index.parquet" in names
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


@pytest.mark.parametrize("upload", ["thread", pytest.param("process", marks=pytest.mark.proc)])
def test_checkpoint_is_the_sync_save_of_the_same_step_while_training_goes_on(tmp_path, upload):
    model, opt, counter, comps = _training()
    options = AsyncOptions(staging="overlapped", upload=upload, lazy_min_bytes=4096)
    with CheckpointCoordinator(comps, output_dir=tmp_path, chunk_policy=SMALL_CHUNKS, async_options=options) as coord:
        coord.install_step_hook(opt)
        handles = []
        for step in range(1, 7):
            _step(model, opt, counter)
            if step % 3 == 0:  # the sync save first: it reads the same state and the same RNG
                coord.save_checkpoint(checkpoint_id=f"sync-{step}")
                handles.append(coord.async_save(checkpoint_id=f"async-{step}"))
                assert handles[-1].copy_seconds is None or handles[-1].copy_seconds >= 0
        paths = [h.result() for h in handles]
    assert all(h.staged_bytes > 0 for h in handles)
    for path in paths:
        step = path.rsplit("-", 1)[1]
        _data_files_equal(str(tmp_path / f"sync-{step}"), path)


def test_the_step_hook_is_what_keeps_the_save_exact(tmp_path):
    """Without the hook the same loop changes the parameters under the copy: the save is refused,
    naming what changed, and nothing is committed."""
    model, opt, counter, comps = _training()
    with CheckpointCoordinator(comps, output_dir=tmp_path, async_options=OVERLAPPED) as coord:
        coord.save_checkpoint(checkpoint_id="before")
        handle = coord.async_save(checkpoint_id="unhooked")
        _step(model, opt, counter)  # changes every parameter in place, undeclared
        with pytest.raises(UndeclaredMutationError, match=r"'model\.0\.weight'.*changed in place") as err:
            handle.result()
        assert "install_step_hook" in str(err.value)
        hook = coord.install_step_hook(opt)
        expected = snapshot(dict(model.state_dict()))
        handle = coord.async_save(checkpoint_id="hooked")
        _step(model, opt, counter)
        path = handle.result()
        hook.remove()
    assert list_checkpoints(tmp_path) == [str(tmp_path / "before"), path]
    fresh, _, _, fresh_comps = _training(seed=1)
    CheckpointCoordinator(fresh_comps[:1], output_dir=tmp_path).load_checkpoint(path, strict=False)
    assert_same(dict(fresh.state_dict()), expected)


def test_small_state_is_copied_at_the_call_and_may_change_at_once(tmp_path):
    """RNG, dataloader and scheduler state change during the forward pass or when the next batch is
    drawn, before any optimizer step: they are copied at the call, so changing them is no mutation."""
    small = {"rng_like": torch.zeros(8), "cursor": [0, 1], "epoch": 3}
    big = {"w": torch.ones(4096)}
    with CheckpointCoordinator([StateComponent("small", Box(small), "global"),
                                StateComponent("big", Box(big), "global")],
                               output_dir=tmp_path, async_options=OVERLAPPED) as coord:
        handle = coord.async_save(checkpoint_id="c")
        small["rng_like"].add_(5)  # in place, undeclared: fine, it was copied at the call
        small["cursor"].append(2)
        with coord.mutating():
            big["w"].mul_(3)  # declared: waits for the copy first
        path = handle.result()
        assert handle.copy_seconds is not None
    target = Box({"rng_like": torch.empty(8), "cursor": None, "epoch": None})
    CheckpointCoordinator([StateComponent("small", target, "global")], output_dir=tmp_path
                          ).load_checkpoint(path, strict=False)
    assert torch.equal(target.state["rng_like"], torch.zeros(8)) and target.state["cursor"] == [0, 1]


def _expect_refused(case: StagingCase) -> set[str]:
    """The names of edited tensors on deferred storages before the first declared mutation point."""
    refused = set()
    for name, declared in case.edits:
        if declared:
            break
        if case.tensors[name].untyped_storage().nbytes() >= case.lazy_min_bytes:
            refused.add(name)
    return refused


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=staging_cases())
def test_a_save_is_the_state_of_the_call_or_refused(tmp_path_factory, case):
    """Whatever is edited in place after the call, declared or not, the save either holds exactly the
    values of the call or is refused (an undeclared edit of a tensor copied in the background), and a
    refused save is not committed."""
    root = tmp_path_factory.mktemp("overlap")
    tensors = dict(case.tensors)
    expected = snapshot(tensors)
    refused = _expect_refused(case)
    options = AsyncOptions(staging="overlapped", lazy_min_bytes=case.lazy_min_bytes)
    with CheckpointCoordinator([StateComponent("box", Box(tensors), "global")], output_dir=root,
                               async_options=options) as coord:
        handle = coord.async_save(checkpoint_id="c")
        for name, declared in case.edits:
            if declared:
                coord.wait_for_staging()
            tensors[name].add_(1)
        error = handle.exception()
    if refused:
        assert isinstance(error, UndeclaredMutationError)
        assert latest_checkpoint(root) is None
        return
    assert error is None
    target = Box(empty_like_state(expected))
    CheckpointCoordinator([StateComponent("box", target, "global")], output_dir=root).load_checkpoint()
    assert_same(target.state, expected)


def test_the_next_save_close_and_teardown_release_a_staging_nobody_released(tmp_path):
    big = {"w": torch.ones(1 << 16)}
    coord = CheckpointCoordinator([StateComponent("big", Box(big), "global")], output_dir=tmp_path,
                                  async_options=OVERLAPPED)
    first = coord.async_save(checkpoint_id="a")
    second = coord.async_save(checkpoint_id="b")  # settles the first: releases it, nothing changed
    assert first.done() and first.result().endswith("a")
    coord.close()  # releases and settles the second
    assert second.done() and second.result().endswith("b")
    assert list_checkpoints(tmp_path) == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_overlapped_options_are_checked_when_built():
    with pytest.raises(ValueError, match="staging must be one of"):
        AsyncOptions(staging="lazy")
    with pytest.raises(ValueError, match="upload must be one of"):
        AsyncOptions(upload="fork")
    with pytest.raises(ValueError, match="lazy_min_bytes"):
        AsyncOptions(lazy_min_bytes=-1)
    with pytest.raises(TypeError, match="async_options"):
        CheckpointCoordinator([], async_options={"staging": "overlapped"})


def test_synchronize_staging_is_the_stagers_mutation_point():
    """DCP's AsyncStager protocol: after ``synchronize_staging()`` the caller may change the state. For an
    overlapped staging it waits for the background copy, so an in-place change afterwards is no
    undeclared mutation and the staged state is that of the call."""
    stager = ForgeStager(overlap=True, lazy_min_bytes=4096)
    state = {"w": torch.arange(1 << 12, dtype=torch.float32)}
    expected = snapshot(state)
    try:
        staged = stager.stage(state)
        assert stager.in_flight is not None
        stager.synchronize_staging()
        assert stager.in_flight.released
        state["w"].add_(1)
        assert_same(staged.result(timeout=60), expected)
        stager.synchronize_staging()  # idempotent
    finally:
        stager.close()
