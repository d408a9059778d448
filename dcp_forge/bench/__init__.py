"""Benchmarks behind ``dcp-forge bench`` and the ``tools/bench_*.py`` scripts.

Performance is measured here, as ratios within one run against the limits of the same machine
(never with timed assertions in tests): save/load against the disk (save_load.py, disk.py),
planning (planning.py), inspect/diff at a million items (index_scale.py); suite.py runs them all.
"""
