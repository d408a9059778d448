"""SIGKILL during tiered saves (tests/support/crash_harness.py with ``tiers=True``: every rank a node with
its own local tier and one peer copy, ``out_dir`` the remote tier): kills during the local commit,
during peer copies, during drains and during retention in either tier. After every trial the newest
checkpoint committed in some tier is this trial's exactly when it committed somewhere, every committed
copy (each node's, each drained one) verifies clean, a drained copy carries its local save's commit
record, and the next job loads the newest bit-exact on every rank (by hand: ``python -m
tools.crash_harness --tiers --trials 200``)."""

from __future__ import annotations

import pytest

from tests.support.crash_harness import run_trials

# Each step of the tiered protocol, on every rank that performs it, is a kill point at least once.
TIER_STEPS = [
    "create_exclusive _CLAIMED", "write data file", "write_bytes index.parquet", "open_output peer data file",
    "write peer data file", "close peer data file", "create_exclusive _TIER", "create_exclusive _COMMITTED",
    "create_exclusive remote _CLAIMED", "write remote data file", "close remote data file",
    "write_bytes remote checkpoint_manifest.json", "write_bytes remote _TIER", "create_exclusive remote _COMMITTED",
    "remove _COMMITTED", "remove_tree checkpoint dir", "remove remote _COMMITTED",
]
TRIALS = 30


@pytest.fixture(scope="module")
def report(kills, tmp_path_factory):
    return run_trials(TRIALS, world=2, seed=5, mib=1.0, out_dir=str(tmp_path_factory.mktemp("remote")), tiers=True,
                      sweep=TIER_STEPS)


def test_no_kill_exposes_a_partial_or_wrong_checkpoint_in_either_tier(report):
    assert report.failures == []
    assert report.trials == TRIALS and report.not_killed <= 2


def test_the_newest_checkpoint_of_some_tier_loaded_bit_exact_on_every_rank_after_every_trial(report):
    assert report.loads_checked == 2 * (TRIALS + 3)


@pytest.mark.parametrize("step", TIER_STEPS)
def test_each_step_of_the_tiered_protocol_was_a_kill_point(report, step):
    assert report.kill_points.get(step, 0) + report.kill_points.get(f"{step} (torn)", 0) >= 1, \
        dict(report.kill_points)


def test_async_tiered_saves_killed_mid_commit_or_drain_expose_nothing_partial(kills, tmp_path):
    steps = ["close peer data file", "create_exclusive _COMMITTED", "close remote data file",
             "create_exclusive remote _COMMITTED"]
    report = run_trials(8, world=2, seed=6, mib=1.0, out_dir=str(tmp_path), use_async=True, tiers=True, sweep=steps)
    assert report.failures == []
    assert report.loads_checked == 2 * (8 + 3)
    assert all(report.kill_points.get(s, 0) + report.kill_points.get(f"{s} (torn)", 0) >= 1 for s in steps), \
        dict(report.kill_points)
