"""Storage tiers in one process: a save commits to the local tier and returns, then drains to output_dir
with its own commit (the same commit record, every byte checked on the way); loads take the newest
intact checkpoint of either tier, the local copy first; retention per tier; the manager's resume;
``dcp-forge ls``. Multi-node peer copies and recovery are in test_tiers_dist.py, kills in
test_crash_tiers.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import pytest
import torch

from dcp_forge import (
    AsyncOptions,
    CheckpointCoordinator,
    ComponentDeclarationError,
    DrainError,
    LocalTier,
    StateComponent,
    list_checkpoints,
    verify_checkpoint,
)
from dcp_forge.cli import main
from dcp_forge.format.names import CLAIM_FILE, COMMIT_FILE, MANIFEST_FILE, TIER_FILE
from dcp_forge.format.tier_record import LOCAL, REMOTE, TierRecord
from dcp_forge.manager.manager import CheckpointManager, CheckpointPolicy
from dcp_forge.storage import CheckpointState, checkpoint_state, open_backend
from tests.support.fault_proxy import FaultProxy
from tests.support.object_store import storage_options_for
from tests.support.statefuls import Box
from tests.support.tamper import data_files, flip_byte


def state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 33, generator=gen), "ids": torch.randint(-2**40, 2**40, (77,), generator=gen),
            "h": torch.randn(9, generator=gen).to(torch.bfloat16), "step": step}


def empty() -> dict:
    return {"w": torch.zeros(64, 33), "ids": torch.zeros(77, dtype=torch.int64), "h": torch.zeros(9, dtype=torch.bfloat16),
            "step": -1}


def bit_exact(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
        if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def coordinator(tmp_path, box: Box, out: str | None = None, options: dict | None = None,
                async_options: AsyncOptions | None = None, **tier) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("model", box, "replicated")], output_dir=out or str(tmp_path / "remote"),
                                 storage_options=options, local_tier=LocalTier(str(tmp_path / "local"), **tier),
                                 async_options=async_options)


def committed(path) -> bool:
    backend, native = open_backend(os.fspath(path))
    return checkpoint_state(backend, native) is CheckpointState.COMMITTED


def test_a_save_commits_locally_then_drains_a_byte_identical_copy_with_the_same_commit(tmp_path):
    box = Box(state(1))
    with coordinator(tmp_path, box) as coord:
        path = coord.save_checkpoint(checkpoint_id="c-1")
        local = tmp_path / "local" / "c-1"
        assert path == str(tmp_path / "remote" / "c-1") and committed(local)
        coord.wait()
    remote = tmp_path / "remote" / "c-1"
    assert committed(remote) and verify_checkpoint(remote) == [] and verify_checkpoint(local) == []
    for name in [COMMIT_FILE, MANIFEST_FILE, ".metadata", "index.parquet", *data_files(local)]:
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    here = TierRecord.from_bytes((local / TIER_FILE).read_bytes(), "local")
    there = TierRecord.from_bytes((remote / TIER_FILE).read_bytes(), "remote")
    assert (here.tier, there.tier) == (LOCAL, REMOTE) and here.save_id == there.save_id
    assert json.loads((remote / COMMIT_FILE).read_bytes())["save_id"] == here.save_id
    assert json.loads((remote / CLAIM_FILE).read_bytes())["save_id"] == here.save_id
    assert here.data_files == there.data_files == {n: (local / n).stat().st_size for n in data_files(local)}


def test_loads_prefer_the_local_copy_and_fall_back_to_the_remote_one_when_it_is_damaged(tmp_path, caplog):
    box = Box(state(1))
    with coordinator(tmp_path, box) as coord:
        coord.save_checkpoint(checkpoint_id="c-1")
        coord.wait()
        box.state = empty()
        result = coord.load_checkpoint()
        assert result.tier == LOCAL and bit_exact(box.state, state(1)) and os.fspath(result).endswith("remote/c-1")
        local = tmp_path / "local" / "c-1"
        flip_byte(local / data_files(local)[0], 200)
        box.state = empty()
        with caplog.at_level(logging.WARNING, logger="dcp_forge.coordinator"):
            result = coord.load_checkpoint(tmp_path / "local" / "c-1")  # a path in either tier names the checkpoint
        assert result.tier == REMOTE and bit_exact(box.state, state(1))
        assert "could not load c-1 (the local tier) (IntegrityError: " in caplog.text
        assert "checksum mismatch" in caplog.text and "loading c-1 (the remote tier) instead" in caplog.text
        shutil.rmtree(local)
        box.state = empty()
        assert coord.load_checkpoint().tier == REMOTE and bit_exact(box.state, state(1))


def test_a_checkpoint_damaged_in_every_tier_is_refused(tmp_path):
    box = Box(state(1))
    with coordinator(tmp_path, box) as coord:
        coord.save_checkpoint(checkpoint_id="c-1")
        coord.wait()
        for root in ("local", "remote"):
            copy = tmp_path / root / "c-1"
            flip_byte(copy / data_files(copy)[0], 200)
        box.state = empty()
        with pytest.raises(Exception, match="checksum mismatch"):
            coord.load_checkpoint()


def test_each_tier_keeps_its_own_checkpoints_and_every_nth_save_is_drained(tmp_path):
    box = Box(state(0))
    with coordinator(tmp_path, box, keep=2, drain_every=2) as coord:
        for step in range(1, 6):
            box.state = state(step)
            coord.wait()  # else local retention may keep a checkpoint whose drain is still running, until the next save
            coord.save_checkpoint(checkpoint_id=f"c-{step}")
        coord.wait()
        coord.save_checkpoint(checkpoint_id="c-6", drain=False)
        coord.save_checkpoint(checkpoint_id="c-7", drain=True)
        coord.wait()
    assert sorted(os.listdir(tmp_path / "local")) == ["c-6", "c-7"]
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "remote")] == ["c-2", "c-4", "c-7"]


@pytest.mark.parametrize("options", [AsyncOptions(), AsyncOptions(staging="overlapped", lazy_min_bytes=1024),
                                     pytest.param(AsyncOptions(upload="process"), marks=pytest.mark.proc)],
                         ids=["blocking", "overlapped", "process"])
def test_async_tiered_saves_keep_the_state_of_the_call(tmp_path, options):
    box = Box(state(1))
    with coordinator(tmp_path, box, async_options=options) as coord:
        handle = coord.async_save(checkpoint_id="c-1")
        with coord.mutating():  # a declared mutation point: training goes on
            box.state["w"].add_(1)
        assert handle.result() == str(tmp_path / "remote" / "c-1")
        coord.wait()
        box.state = empty()
        assert coord.load_checkpoint().tier == LOCAL and bit_exact(box.state, state(1))
        shutil.rmtree(tmp_path / "local" / "c-1")
        box.state = empty()
        assert coord.load_checkpoint().tier == REMOTE and bit_exact(box.state, state(1))


def test_tier_settings_that_cannot_work_are_refused(tmp_path):
    box = Box(state(1))
    with pytest.raises(ComponentDeclarationError, match="must be separate directories"):
        CheckpointCoordinator([StateComponent("model", box, "replicated")], output_dir=str(tmp_path),
                              local_tier=str(tmp_path / "local"))
    with pytest.raises(ValueError, match="peer_copies=1 needs at least 2 nodes"):
        coordinator(tmp_path, box, peer_copies=1)
    with coordinator(tmp_path, box) as coord:
        with pytest.raises(ComponentDeclarationError, match="checkpoint_path .* is not under"):
            coord.save_checkpoint(checkpoint_path=tmp_path / "elsewhere" / "c-1")
        assert coord.save_checkpoint(checkpoint_path=tmp_path / "remote" / "c-1") == str(tmp_path / "remote" / "c-1")
    with CheckpointCoordinator([StateComponent("model", box, "replicated")], output_dir=str(tmp_path / "x")) as plain, \
            pytest.raises(ComponentDeclarationError, match="'drain' needs a coordinator with a local_tier"):
        plain.save_checkpoint(checkpoint_id="c-1", drain=True)


def _manager(tmp_path, box: Box, **tier) -> CheckpointManager:
    policy = CheckpointPolicy(output_dir=str(tmp_path / "remote"), save_steps=1, save_total_limit=2,
                              local_tier=LocalTier(str(tmp_path / "local"), **tier))
    return CheckpointManager(policy, [StateComponent("model", box, "replicated")])


def test_training_arguments_take_a_local_tier_for_their_checkpoint_policy(tmp_path):
    from dcp_forge.trainers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "remote"), local_tier=str(tmp_path / "local"))
    assert args.checkpoint_policy().local_tier == LocalTier(str(tmp_path / "local"))
    tier = LocalTier(str(tmp_path / "local"), keep=1)
    assert TrainingArguments(output_dir="x", local_tier=tier).training_hash() == TrainingArguments(output_dir="x").training_hash()
    with pytest.raises(ValueError, match="TrainingArguments.local_tier must be a LocalTier, a local directory or None"):
        TrainingArguments(output_dir="x", local_tier=3)


def test_the_manager_resumes_from_the_local_tier_and_finishes_interrupted_drains(tmp_path):
    box = Box(state(0))
    manager = _manager(tmp_path, box, keep=1)
    manager.prepare_output_dir(resuming=False)
    for step in (1, 2, 3):
        box.state = state(step)
        manager.save(step=step, epoch=0)
    manager.close()
    assert sorted(os.listdir(tmp_path / "local")) == ["checkpoint-3"]
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "remote")] == ["checkpoint-2", "checkpoint-3"]
    # A crash: checkpoint-3's drain was cut short (its remote copy uncommitted), checkpoint-4 was being written.
    remote3 = tmp_path / "remote" / "checkpoint-3"
    (remote3 / COMMIT_FILE).unlink()
    (remote3 / data_files(remote3)[0]).unlink()
    partial = tmp_path / "local" / "checkpoint-4"
    partial.mkdir()
    (partial / CLAIM_FILE).write_text(json.dumps({"save_id": "dcp_forge-x", "claimed_at": 1.0, "pid": 1}))
    (partial / "__0_0.distcp").write_bytes(b"half")
    box.state = empty()
    manager = _manager(tmp_path, box, keep=1)
    discarded = manager.prepare_output_dir(resuming=True)
    assert any("checkpoint-4" in d for d in discarded) and any("remote/checkpoint-3" in d for d in discarded)
    assert manager.resume(True) == str(remote3) and bit_exact(box.state, state(3))
    assert manager.coordinator.tiers.last_loaded.tier == LOCAL
    manager.close()
    assert committed(remote3) and verify_checkpoint(remote3) == []
    shutil.rmtree(tmp_path / "remote")
    fresh = _manager(tmp_path, box, keep=1)
    with pytest.raises(ValueError, match=r"1 committed checkpoint\(s\) \(newest: checkpoint-3 \(local tier\)\)"):
        fresh.prepare_output_dir(resuming=False)
    fresh.close()


def test_local_retention_spares_the_checkpoint_being_drained_until_the_manager_closes(tmp_path, monkeypatch):
    from dcp_forge.tiers import drain as drain_module
    from dcp_forge.tiers.tiered import TieredStorage

    # checkpoint-2's drain is held until the third save's local retention ran: it runs while draining.
    gate, spared = threading.Event(), []
    copy = drain_module.copy_verified

    def held(source, out, verifier, *args):
        if "checkpoint-2" in out.path:
            assert gate.wait(60)
        return copy(source, out, verifier, *args)

    retain = TieredStorage.apply_retention

    def retain_then_release(self, group):
        deleted = retain(self, group)
        if self.last_commit is not None and self.last_commit.checkpoint_id == "checkpoint-3" and not gate.is_set():
            spared.extend(sorted(os.listdir(tmp_path / "local")))
            gate.set()
        return deleted

    monkeypatch.setattr(drain_module, "copy_verified", held)
    monkeypatch.setattr(TieredStorage, "apply_retention", retain_then_release)
    box = Box(state(0))
    manager = _manager(tmp_path, box, keep=1)
    for step in (1, 2, 3):
        box.state = state(step)
        manager.save(step=step, epoch=0)
    manager.close()
    assert spared == ["checkpoint-2", "checkpoint-3"]  # kept while it drained
    assert sorted(os.listdir(tmp_path / "local")) == ["checkpoint-3"]  # keep=1 once the drain ended
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "remote")] == ["checkpoint-2", "checkpoint-3"]


def test_resuming_past_a_local_checkpoint_that_cannot_load_frees_its_id(tmp_path, caplog):
    box = Box(state(0))
    with coordinator(tmp_path, box, keep=3) as coord:
        for step in (1, 2):
            box.state = state(step)
            coord.save_checkpoint(checkpoint_id=f"checkpoint-{step}", drain=step == 1)
    # checkpoint-2 was never drained and has lost a data file: nothing can load it.
    copy = tmp_path / "local" / "checkpoint-2"
    (copy / data_files(copy)[0]).unlink()
    box.state = empty()
    manager = _manager(tmp_path, box, keep=3)
    manager.prepare_output_dir(resuming=True)
    with caplog.at_level(logging.WARNING):
        assert manager.resume(True).endswith("checkpoint-1") and bit_exact(box.state, state(1))
    assert "checkpoint-2 is committed in the local tier but cannot be loaded from it: data file(s) __0_" in caplog.text
    assert "deleted the local tier's newer checkpoints checkpoint-2" in caplog.text
    box.state = state(2)
    manager.save(step=2, epoch=0)  # the same id again
    manager.close()
    box.state = empty()
    with coordinator(tmp_path, box, keep=3) as coord:
        assert coord.load_checkpoint().tier == LOCAL and bit_exact(box.state, state(2))


def test_ls_shows_each_checkpoint_in_each_tier(tmp_path, capsys):
    box = Box(state(1))
    with coordinator(tmp_path, box, keep=1) as coord:
        coord.save_checkpoint(checkpoint_id="c-1")
        coord.wait()  # local retention keeps a checkpoint while it drains
        coord.save_checkpoint(checkpoint_id="c-2", drain=False)
    remote, local = str(tmp_path / "remote"), str(tmp_path / "local")
    assert main(["ls", remote, "--local-dir", local]) == 0
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split()[-4:] == ["local", "tier", "remote", "tier"]
    assert first.split()[0] == "c-1" and first.split()[-2:] == ["-", "committed"]  # drained, gone locally (keep=1)
    assert second.split()[0] == "c-2" and second.endswith("committed (local: node 0 of 1)  -")  # never drained
    assert main(["ls", local]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("committed  local: node 0 of 1")
    assert main(["ls", remote]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("committed  remote (drained copy)")
    assert main(["ls", remote, "--local-dir", local, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], sorted(set(r) - {"name"})) for r in rows] == [("c-1", ["remote"]), ("c-2", ["local"])]


# --- a remote tier on S3 -----------------------------------------------------------------------------
def test_drains_to_s3_and_recovers_without_reading_remote_data(tmp_path, s3_url, s3_server_info):
    box = Box(state(1))
    with FaultProxy(s3_server_info.endpoint_url) as proxy:
        options = {**storage_options_for(s3_server_info), "endpoint_url": proxy.endpoint_url}
        with coordinator(tmp_path, box, out=s3_url, options=options) as coord:
            coord.save_checkpoint(checkpoint_id="c-1")
            box.state = state(2)
            coord.save_checkpoint(checkpoint_id="c-2")
        assert verify_checkpoint(f"{s3_url}/c-2", options) == []
        proxy.reset_stats()
        box.state = empty()
        with coordinator(tmp_path, box, out=s3_url, options=options) as coord:
            result = coord.load_checkpoint()
        assert result.tier == LOCAL and bit_exact(box.state, state(2))
        # The remote tier is asked for its listing and its commit markers (is anything there newer?), nothing more.
        objects = [path for _, method, path, _ in proxy.events() if method in ("GET", "HEAD")
                   and path.startswith("/" + s3_url[len("s3://"):] + "/")]
        assert objects and all(path.endswith(f"/{COMMIT_FILE}") for path in objects), objects


def test_a_failed_drain_is_raised_once_and_leaves_nothing_committed_remotely(tmp_path, s3_url, s3_server_info):
    box = Box(state(1))
    with FaultProxy(s3_server_info.endpoint_url) as proxy:
        options = {**storage_options_for(s3_server_info), "endpoint_url": proxy.endpoint_url,
                   "config_kwargs": {"region_name": s3_server_info.region, "retries": {"total_max_attempts": 2}}}
        coord = coordinator(tmp_path, box, out=s3_url, options=options)
        proxy.configure(fraction=1.0, kinds=("internal_error",), methods=("PUT", "POST"))
        coord.save_checkpoint(checkpoint_id="c-1")  # committed locally; its drain fails in the background
        coord.tiers.wait()
        proxy.configure(fraction=0.0)
        with pytest.raises(DrainError, match="draining c-1 to the remote tier failed"):
            coord.save_checkpoint(checkpoint_id="c-2")
        assert coord.save_checkpoint(checkpoint_id="c-2").endswith("c-2")  # raised once; saves go on
        coord.close()
    direct = storage_options_for(s3_server_info)
    assert [os.path.basename(p) for p in list_checkpoints(s3_url, direct)] == ["c-2"]
    box.state = empty()
    with coordinator(tmp_path, box, out=s3_url, options=direct) as coord:
        assert coord.load_checkpoint(f"{s3_url}/c-1").tier == LOCAL and bit_exact(box.state, state(1))
