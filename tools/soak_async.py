"""Soak of async saves alone (issue 4's target P5): ``tools/soak.py --modes async`` with its defaults.

Many consecutive async saves, old checkpoints deleted as new ones commit; RSS, threads, fds and
child processes must not grow (see tools/soak.py for what is measured and the targets).

Usage: ``python tools/soak_async.py [--saves 100] [--mib 256] [--world 1] [--dir .bench]``.
A short version (10 saves of a small state) runs in CI: tests/test_async_soak.py.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.soak import KEEP, RSS_GROWTH_LIMIT, Weights, main, resources, soak, verdict  # noqa: E402

__all__ = ["KEEP", "RSS_GROWTH_LIMIT", "Weights", "resources", "soak", "verdict"]

if __name__ == "__main__":
    sys.exit(main(default_modes="async", default_saves=100))
