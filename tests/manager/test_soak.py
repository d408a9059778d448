"""Short soak (the long one is python -m tools.soak: 200 sync + 200 async saves): on 2 gloo ranks, 12 sync
then 12 async saves with replication checks and retention; RSS, threads, fds and child processes must
not grow, and close() gives back every thread, fd and child process."""

from __future__ import annotations

import pytest

from tests.support.soak import KEEP, run, verdict

SAVES = 12


@pytest.fixture(scope="module")
def reports(rank_processes, tmp_path_factory):
    return run(("sync", "async"), saves=SAVES, mib=16, world=2, directory=str(tmp_path_factory.mktemp("soak")))


@pytest.mark.parametrize("index", range(4), ids=["sync-rank0", "sync-rank1", "async-rank0", "async-rank1"])
def test_nothing_leaks(reports, index):
    report = reports[index]
    assert report["mode"] == ("sync" if index < 2 else "async")
    assert verdict(report) == [], report["snapshots"]
    assert report["committed"] == [f"checkpoint-{i}" for i in range(SAVES - KEEP, SAVES)]
