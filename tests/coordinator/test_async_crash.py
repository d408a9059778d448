"""Async save across process death: SIGKILL at a random moment leaves the previous checkpoint the
latest (tests/support/crash_async.py, 3 trials here), and interpreter exit finishes the in-flight save."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import torch

from dcp_forge import CheckpointCoordinator, StateComponent, latest_checkpoint, list_checkpoints
from tests.support.crash_async import run_trials
from tests.support.paths import REPO
from tests.support.statefuls import Box

ROOT = str(REPO)


def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint_latest(kills, tmp_path):
    seed = random.randrange(1 << 30)
    results = run_trials(3, mib=64, directory=str(tmp_path / "crash"), seed=seed)  # raises if a guarantee broke
    assert len(results) == 3, f"seed {seed}"
    assert all(r["latest"] in ("checkpoint-1", "checkpoint-2") for r in results)


# The script ends with one coordinator's save failed in the background (nothing raised it: no later
# save, no close()) and another coordinator's save in flight (no result(), no close()).
SCRIPT_ENDING_MID_SAVE = """
import sys, torch
from dcp_forge import CheckpointCoordinator, StateComponent
from tests.support.statefuls import Box

state = {"t": torch.arange(1 << 22, dtype=torch.float64), "step": 7}
failing = CheckpointCoordinator([StateComponent("box", Box(state), "global")], output_dir=sys.argv[1])
failing.async_save(checkpoint_id="first").result()
failing.async_save(checkpoint_id="first")  # fails in the background: the id is taken
saving = CheckpointCoordinator([StateComponent("box", Box(state), "global")], output_dir=sys.argv[1])
saving.async_save(checkpoint_id="in-flight")
state["t"].mul_(-1)  # after staging: must not reach the checkpoint
state["step"] = 8
print("STARTED", flush=True)
"""


def _run(script: str, directory) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True,
                          env=env, timeout=180)


def test_interpreter_exit_finishes_the_in_flight_save_and_reports_unraised_failures(tmp_path):
    proc = _run(SCRIPT_ENDING_MID_SAVE, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "STARTED" in proc.stdout
    assert "async save of" in proc.stderr and "first failed: CheckpointExistsError" in proc.stderr
    assert latest_checkpoint(tmp_path) == str(tmp_path / "in-flight")
    assert list_checkpoints(tmp_path) == [str(tmp_path / "first"), str(tmp_path / "in-flight")]
    target = Box({"t": torch.zeros(1 << 22, dtype=torch.float64), "step": 0})
    CheckpointCoordinator([StateComponent("box", target, "global")], output_dir=tmp_path).load_checkpoint()
    assert target.state["step"] == 7 and torch.equal(target.state["t"], torch.arange(1 << 22, dtype=torch.float64))
