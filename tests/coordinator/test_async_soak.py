"""Short soak (the long one is python -m tools.soak --modes async): 10 consecutive async saves, old checkpoints
deleted as new ones commit; RSS, threads, fds and child processes must not grow."""

from __future__ import annotations

from tests.support.soak import KEEP, soak, verdict


def test_ten_async_saves_leak_nothing(tmp_path):
    report = soak(0, 1, str(tmp_path), saves=10, mib=16)
    assert verdict(report) == [], report["snapshots"]
    assert report["committed"] == [f"checkpoint-{i}" for i in range(10 - KEEP, 10)]
