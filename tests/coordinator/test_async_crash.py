"""Async save across process death: SIGKILL at a random moment leaves the previous checkpoint the
latest (tests/support/crash_async.py, 3 trials here), and interpreter exit finishes the in-flight save."""

from __future__ import annotations

import os
import random
import subprocess

import pytest
import torch

from dcp_forge import AsyncOptions, CheckpointCoordinator, StateComponent, latest_checkpoint, list_checkpoints
from tests.support.crash_async import process_gone, run_trials
from tests.support.paths import REPO
from tests.support.statefuls import Box

ROOT = str(REPO)


@pytest.mark.parametrize("options", [AsyncOptions(), pytest.param(AsyncOptions(staging="overlapped", upload="process"),
                                                                   marks=pytest.mark.proc)],
                         ids=["blocking-thread", "overlapped-process"])
def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint_latest(kills, tmp_path, options):
    """Upload processes die with their training process (checked by run_trials), never to commit later."""
    seed = random.randrange(1 << 30)
    # raises if a guarantee broke
    results = run_trials(3, mib=64, directory=str(tmp_path / "crash"), seed=seed, options=options)
    assert len(results) == 3, f"seed {seed}"
    assert all(r["latest"] in ("checkpoint-1", "checkpoint-2") for r in results)


# The script ends with one coordinator's save failed in the background (nothing raised it: no later
# save, no close()) and another coordinator's save in flight (no result(), no close()).
SCRIPT_ENDING_MID_SAVE = """
import sys, torch
from dcp_forge import AsyncOptions, CheckpointCoordinator, StateComponent
from tests.support.statefuls import Box

staging, upload = sys.argv[2].split("-")
options = AsyncOptions(staging=staging, upload=upload)

state = {"t": torch.arange(1 << 22, dtype=torch.float64), "step": 7}
failing = CheckpointCoordinator([StateComponent("box", Box(state), "global")], output_dir=sys.argv[1],
                                async_options=options)
failing.async_save(checkpoint_id="first").result()
failing.async_save(checkpoint_id="first")  # fails in the background: the id is taken
saving = CheckpointCoordinator([StateComponent("box", Box(state), "global")], output_dir=sys.argv[1],
                               async_options=options)
saving.async_save(checkpoint_id="in-flight")
with saving.mutating(), failing.mutating():  # both coordinators save this state
    state["t"].mul_(-1)  # after staging: must not reach the checkpoint
state["step"] = 8
for coordinator in (failing, saving):
    if coordinator._async_saves.upload_process is not None:
        print("UPLOAD", coordinator._async_saves.upload_process.pid, flush=True)
print("STARTED", flush=True)
"""


def _run(python: str, script: str, directory, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([python, "-c", script, str(directory), mode], capture_output=True, text=True,
                          env=env, timeout=180)


@pytest.mark.parametrize("mode", ["blocking-thread", "overlapped-process"])
def test_interpreter_exit_finishes_the_in_flight_save_and_reports_unraised_failures(interpreters, tmp_path, mode):
    proc = _run(interpreters, SCRIPT_ENDING_MID_SAVE, tmp_path, mode)
    assert proc.returncode == 0, proc.stderr
    assert "STARTED" in proc.stdout
    uploads = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("UPLOAD")]
    assert len(uploads) == (2 if mode.endswith("process") else 0)
    assert all(process_gone(pid) for pid in uploads)  # stopped at exit, after their saves
    assert "async save of" in proc.stderr and "first failed: CheckpointExistsError" in proc.stderr
    assert latest_checkpoint(tmp_path) == str(tmp_path / "in-flight")
    assert list_checkpoints(tmp_path) == [str(tmp_path / "first"), str(tmp_path / "in-flight")]
    target = Box({"t": torch.zeros(1 << 22, dtype=torch.float64), "step": 0})
    CheckpointCoordinator([StateComponent("box", target, "global")], output_dir=tmp_path).load_checkpoint()
    assert target.state["step"] == 7 and torch.equal(target.state["t"], torch.arange(1 << 22, dtype=torch.float64))
