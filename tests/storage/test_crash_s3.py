"""SIGKILL during sync and async saves on s3:// (the session's SeaweedFS): tests/support/crash_harness.py
with a handful of trials here (``--s3 --trials 200`` by hand, docs/INTEGRITY.md has the counts).

After every kill the latest checkpoint is the newest one whose commit marker exists, it loads
bit-exact on every rank, and nothing partial is listed or loadable. The few sync trials first kill
rank 0 at the two object-storage steps that matter most (the conditional PUT of the commit marker,
and the marker's delete that starts retention), then run each of the four kill modes once; the
async trials kill rank 0 while its background upload writes a data file, then at the commit.
"""

from __future__ import annotations

import pytest

from tests.support.crash_harness import run_trials
from tests.support.object_store import S3_BUCKET, fresh_prefix, storage_options_for

SYNC_SWEEP = ("create_exclusive _COMMITTED", "remove _COMMITTED")
SYNC_TRIALS = len(SYNC_SWEEP) + 4  # then event-one, event-all, timer-one, timer-all
ASYNC_SWEEP = ("write data file", "create_exclusive _COMMITTED")


@pytest.fixture
def run_dir(s3_server_info, request) -> tuple[str, dict]:
    return f"s3://{S3_BUCKET}/{fresh_prefix(request)}", storage_options_for(s3_server_info)


def test_sync_saves_killed_on_s3_expose_nothing_partial(kills, run_dir):
    out, options = run_dir
    report = run_trials(SYNC_TRIALS, world=2, seed=3, mib=0.5, out_dir=out, storage_options=options,
                        sweep=SYNC_SWEEP)
    assert report.failures == []
    assert report.trials == SYNC_TRIALS
    assert report.loads_checked == 2 * (SYNC_TRIALS + 3)  # every job after the first, on both ranks
    for step in SYNC_SWEEP:
        assert report.kill_points.get(step, 0) >= 1, dict(report.kill_points)
    assert set(report.modes) == {"event-one", "event-all", "timer-one", "timer-all"}
    assert report.killed_before_commit >= len(SYNC_SWEEP)


def test_async_saves_killed_on_s3_expose_nothing_partial(kills, run_dir):
    out, options = run_dir
    report = run_trials(len(ASYNC_SWEEP), world=2, seed=4, mib=0.5, out_dir=out, storage_options=options,
                        use_async=True, sweep=ASYNC_SWEEP)
    assert report.failures == []
    assert report.trials == len(ASYNC_SWEEP) and report.killed_before_commit == len(ASYNC_SWEEP)
    assert report.loads_checked == 2 * (len(ASYNC_SWEEP) + 3)
    assert all(report.kill_points.get(step, 0) + report.kill_points.get(f"{step} (torn)", 0) == 1
               for step in ASYNC_SWEEP), dict(report.kill_points)
