"""dcp_forge's own process groups wait as long as the job's: a rank whose peer never joins a save fails
after the job's ``init_process_group(timeout=)``, not after gloo's 30-minute default, which groups made
by ``new_group`` get unless told otherwise."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch

from dcp_forge import AsyncOptions, CheckpointCoordinator, StateComponent
from dcp_forge._torch_compat import default_group_timeout
from dcp_forge.format.names import COMMIT_FILE
from tests.support.statefuls import Box

JOB_TIMEOUT_S = 10.0


def _group_timeout(group: object) -> datetime.timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout  # type: ignore[attr-defined]


def _peer_never_saves(rank: int, world: int, root: str, flag: str, mode: str) -> dict:
    coord = CheckpointCoordinator([StateComponent("w", Box({"w": torch.full((4,), float(rank))}), "per_rank")],
                                  output_dir=root, async_options=AsyncOptions(upload="thread"))
    found = {"job": default_group_timeout(), "checkpoint": _group_timeout(coord.group)}
    if rank == 1:  # alive, in every group, but never reaching the save: rank 0 must give up, not hang
        deadline = time.monotonic() + 150
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.1)
        return found
    started = time.monotonic()
    try:
        if mode == "sync":
            coord.save_checkpoint(checkpoint_id="checkpoint-1")
        else:
            coord.async_save(checkpoint_id="checkpoint-1").result()
    except Exception as err:  # the expected outcome: the peer never came
        found["error"] = f"{type(err).__name__}: {err}"
    found["seconds"] = time.monotonic() - started
    with open(flag, "w"):
        pass
    return found


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_save_whose_peer_never_comes_fails_after_the_job_s_timeout(ranks, tmp_path, mode):
    root, flag = str(tmp_path / "ckpt"), str(tmp_path / "rank0-done")
    first, second = ranks(_peer_never_saves, 2, root, flag, mode, timeout=240, collective_timeout=JOB_TIMEOUT_S)
    job = datetime.timedelta(seconds=JOB_TIMEOUT_S)
    assert first["job"] == second["job"] == job
    assert first["checkpoint"] == second["checkpoint"] == job, "the checkpoint group waits as long as the job's"
    assert "error" in first, f"rank 0's save without its peer returned ({first['seconds']:.1f} s)"
    called = "save_checkpoint" if mode == "sync" else "async_save"
    assert first["error"].startswith(f"CollectiveTimeoutError: rank 0 of 2 waited 0:00:10 (the job's collective "
                                     f"timeout) in {called} (its collectives over dcp_forge's process group)"), first["error"]
    assert "a peer rank never reached it" in first["error"]
    # one or two collectives of the failed save (its own, then its cleanup's) each wait out the timeout
    assert first["seconds"] < 6 * JOB_TIMEOUT_S, (first["seconds"], first["error"])
    assert not os.path.exists(os.path.join(root, "checkpoint-1", COMMIT_FILE)), "nothing committed"
