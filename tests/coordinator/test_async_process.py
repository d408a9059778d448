"""Uploads in an upload process (``AsyncOptions(upload="process")``) in one training process: the same
checkpoint a sync save writes, staging memory handed over once and shared (not copied again), the
upload's typed errors on the handle, and an upload process that dies failing the save clearly with
nothing committed."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from dcp_forge import (
    AsyncOptions,
    CheckpointCoordinator,
    CheckpointExistsError,
    StateComponent,
    latest_checkpoint,
    list_checkpoints,
)
from dcp_forge.core.placement import ChunkPolicy
from tests.support.statefuls import Box
from tests.support.states import tricky_state

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.proc]  # each test starts upload processes

PROCESS = AsyncOptions(upload="process", lazy_min_bytes=4096)


def _files(root: str) -> dict[str, bytes]:
    skip = {"_CLAIMED", "_COMMITTED", "checkpoint_manifest.json", ".metadata"}
    out = {}
    for name in sorted(set(os.listdir(root)) - skip):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return out


def test_the_upload_process_writes_what_a_sync_save_writes(tmp_path):
    state = tricky_state(5)
    state["conj"] = torch.randn(64, dtype=torch.complex64).conj()  # a lazy view flag must survive the trip
    model = torch.nn.Linear(64, 64)
    comps = [StateComponent("box", Box(state), "global"), StateComponent("model", model, "replicated")]
    with CheckpointCoordinator(comps, output_dir=tmp_path, async_options=PROCESS,
                               chunk_policy=ChunkPolicy(min_chunk_bytes=4096, chunks_per_holder=2)) as coord:
        sync = coord.save_checkpoint(checkpoint_id="sync")
        handle = coord.async_save(checkpoint_id="async")
        with torch.no_grad():
            model.weight.mul_(-1)  # blocking staging: the state may change at once
        path = handle.result()
        assert handle.manifest is not None and coord.last_manifest is handle.manifest
    assert _files(sync) == _files(path) and "index.parquet" in _files(path)


def test_staging_memory_is_shared_once_and_reused(tmp_path):
    weights = {f"w{i}": torch.full((1 << 14,), float(i)) for i in range(6)}
    with CheckpointCoordinator([StateComponent("box", Box(weights), "global")], output_dir=tmp_path,
                               async_options=PROCESS) as coord:
        coord.async_save(checkpoint_id="a").result()
        arenas = coord._async_saves.upload_process.arenas
        live = set(arenas._arenas)
        assert live and arenas.take_unsent() == []  # handed to the upload process with the first save
        for name in ("b", "c"):
            for w in weights.values():
                w.add_(1)
            coord.async_save(checkpoint_id=name).result()
            assert set(arenas._arenas) == live and arenas.take_unsent() == []  # nothing new to hand over
        # a save of the same id fails in the upload process; its typed error comes back on the handle
        with pytest.raises(CheckpointExistsError, match="already exists"):
            coord.async_save(checkpoint_id="c").result()
    target = Box({name: torch.zeros(1 << 14) for name in weights})
    CheckpointCoordinator([StateComponent("box", target, "global")], output_dir=tmp_path).load_checkpoint()
    assert all(torch.equal(target.state[name], w) for name, w in weights.items())


def test_a_dead_upload_process_fails_the_save_and_commits_nothing(tmp_path):
    box = Box({"w": torch.ones(1 << 14)})
    coord = CheckpointCoordinator([StateComponent("box", box, "global")], output_dir=tmp_path,
                                  async_options=PROCESS)
    coord.async_save(checkpoint_id="first").result()
    pid = coord._async_saves.upload_process.pid
    os.kill(pid, signal.SIGKILL)
    handle = coord.async_save(checkpoint_id="second")
    with pytest.raises(RuntimeError, match=r"the upload process \(pid \d+\) is gone \(exit code -9\)"):
        handle.result()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "first")
    coord.close()  # the failure reached the caller: closing raises nothing
    assert list_checkpoints(tmp_path) == [str(tmp_path / "first")]


@pytest.mark.s3
def test_an_upload_process_saves_to_object_storage(s3_url, s3_storage_options):
    """The writer travels to the upload process with its storage options (its S3 clients are rebuilt there)."""
    weights = {"w": torch.arange(1 << 15, dtype=torch.float32), "step": 3}
    with CheckpointCoordinator([StateComponent("box", Box(weights), "global")], output_dir=s3_url,
                               storage_options=s3_storage_options, async_options=PROCESS) as coord:
        path = coord.async_save(checkpoint_id="c").result()
    target = Box({"w": torch.zeros(1 << 15), "step": None})
    CheckpointCoordinator([StateComponent("box", target, "global")], output_dir=s3_url,
                          storage_options=s3_storage_options).load_checkpoint(path)
    assert torch.equal(target.state["w"], weights["w"]) and target.state["step"] == 3
