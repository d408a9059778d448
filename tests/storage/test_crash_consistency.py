"""SIGKILL during sync and async saves on local disk (tests/support/crash_harness.py: 30 + 16 trials here,
200+ each by hand): the latest checkpoint is always the newest committed one, it loads bit-exact on
every rank, and nothing partial is ever visible. The first trials kill each rank once at each kind of
storage operation it performs (every step of the commit protocol and of retention, rarest first),
the rest at random operations or moments, one rank or all ranks. Async trials keep changing the
state in place while the save uploads."""

from __future__ import annotations

import pytest

from tests.support.crash_harness import run_trials

TRIALS = 30
ASYNC_TRIALS = 16

# Every step of a save on the committing rank, and of retention, must have been a kill point.
PROTOCOL_STEPS = [
    "makedirs checkpoint dir", "create_exclusive _CLAIMED", "open_output data file", "write data file",
    "close data file", "sync_dir checkpoint dir", "write_bytes index.parquet", "write_bytes .metadata",
    "write_bytes checkpoint_manifest.json", "create_exclusive _COMMITTED", "remove _COMMITTED",
    "remove_tree checkpoint dir",
]


@pytest.fixture(scope="module")
def report(kills, tmp_path_factory):
    return run_trials(TRIALS, world=2, seed=0, out_dir=str(tmp_path_factory.mktemp("crash")))


def test_no_trial_exposes_a_partial_or_wrong_checkpoint(report):
    assert report.failures == []
    assert report.trials == TRIALS


def test_kills_really_happened_mid_save(report):
    assert report.not_killed <= 2
    assert report.killed_before_commit >= TRIALS // 2
    assert report.killed_after_commit >= 1  # retention and the moments after the commit are covered too


def test_every_latest_checkpoint_was_loaded_bit_exact_on_every_rank(report):
    assert report.loads_checked == 2 * (TRIALS + 3)  # every job after the first loads on both ranks


@pytest.mark.parametrize("step", PROTOCOL_STEPS)
def test_each_protocol_step_was_a_kill_point(report, step):
    assert report.kill_points.get(step, 0) + report.kill_points.get(f"{step} (torn)", 0) >= 1, \
        dict(report.kill_points)


def test_all_kill_modes_ran(report):
    assert set(report.modes) == {"event-one", "event-all", "timer-one", "timer-all"}


def test_async_saves_killed_mid_upload_expose_nothing_partial(kills, tmp_path):
    report = run_trials(ASYNC_TRIALS, world=2, seed=1, out_dir=str(tmp_path), use_async=True)
    assert report.failures == []
    assert report.trials == ASYNC_TRIALS and report.killed_before_commit >= ASYNC_TRIALS // 2
    assert report.loads_checked == 2 * (ASYNC_TRIALS + 3)
    assert report.kill_points.get("create_exclusive _COMMITTED", 0) == 1
